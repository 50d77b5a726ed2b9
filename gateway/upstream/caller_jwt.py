"""Caller identity for upstreams: a short-lived JWT, signed by the gateway, per request.

For a model with `caller_jwt` configured, every request to its upstreams carries a token in the
configured header (default `x-liutong-caller`) whose claims say who is calling: `key_id` (also
`sub`), `org`, `model`, `request_id` (also `jti`), with `iss`, `aud` (default: the model id),
`iat`, `nbf` and an `exp` `ttl` seconds later. Model servers verify it with the shared secret
or the gateway's public key and never see the client's `lt_` key. A client's own header of
that name is replaced, never forwarded. Signers are built once per configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.config import CallerJwt


class CallerSigner:
    def __init__(self, config: CallerJwt, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        if config.secret is not None:
            self._key: Any = config.secret.encode()
        else:
            assert config.private_key is not None  # type narrowing: config requires a secret or a key
            self._key = load_pem_private_key(config.private_key.encode(), password=None)
        self._headers = {"kid": config.key_id} if config.key_id else None

    @property
    def header(self) -> str:
        return self._config.header

    def token(self, *, key_id: str, org: str | None, model: str, request_id: str) -> str:
        now = int(self._clock())
        claims = {
            "iss": self._config.issuer,
            "aud": self._config.audience or model,
            "sub": key_id,
            "key_id": key_id,
            "org": org,
            "model": model,
            "request_id": request_id,
            "jti": request_id,
            "iat": now,
            "nbf": now,
            "exp": now + max(1, round(self._config.ttl)),
        }
        return jwt.encode(claims, self._key, algorithm=self._config.algorithm, headers=self._headers)


@lru_cache(maxsize=64)
def signer_for(config: CallerJwt) -> CallerSigner:
    """The signer of this configuration (its key parsed once)."""
    return CallerSigner(config)


def caller_header(config: CallerJwt, *, key_id: str, org: str | None, model: str, request_id: str) -> tuple[str, str]:
    """The header name and the token to send upstream for this request."""
    signer = signer_for(config)
    return signer.header, signer.token(key_id=key_id, org=org, model=model, request_id=request_id)
