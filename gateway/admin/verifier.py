"""Admin API authentication: a JWT bearer token, verified with pyjwt, and the role it grants.

`JwtVerifier.verify(header)` accepts a token only when its header's `alg` is one of the
configured algorithms (so never `none`, and never an HMAC algorithm against a public key), its
signature verifies with the configured key for that algorithm family (the HMAC secret; the PEM
public key or the JWKS key named by `kid`), it carries `exp` and a matching `aud` (and `iss`
when an issuer is configured), and it has not expired (with `leeway` seconds of clock skew).
Any failure is a 401. The role claim (a dotted path, a string or a list of strings) must name
the admin or the viewer role, else 403. A JWKS is fetched on first use, kept for
`jwks_cache_seconds`, and fetched again when a token names an unknown `kid` (at most once per
`refresh_cooldown` seconds, so that random kids cannot turn into a flood of fetches).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import orjson
import structlog
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.config import AdminJwt
from gateway.errors import Forbidden, Unauthorized, VerifierUnavailable

log = structlog.get_logger("liutong.admin.jwt")

ADMIN = "admin"
VIEWER = "viewer"
_MAX_TOKEN = 16 * 1024
_MAX_JWKS_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """Who called the admin API: the token's `sub` (for the audit log) and the role it grants."""

    subject: str | None
    role: str  # ADMIN or VIEWER

    @property
    def can_write(self) -> bool:
        return self.role == ADMIN


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


@dataclass(frozen=True, slots=True)
class _Jwk:
    key: Any  # a cryptography public key
    alg: str | None  # the JWK's own `alg`, when it names one


class JwtVerifier:
    def __init__(
        self,
        config: AdminJwt,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_cooldown: float = 1.0,
        fetch_timeout: float = 5.0,
    ) -> None:
        self._config = config
        self._clock = clock
        self._cooldown = refresh_cooldown
        self._fetch_timeout = fetch_timeout
        self._secret = config.secret.encode() if config.secret else None
        self._public_key = load_pem_public_key(config.public_key.encode()) if config.public_key else None
        self._required = ["exp", "aud"] + (["iss"] if config.issuer else [])
        self._jwks: dict[str | None, _Jwk] = {}
        self._fetched_at: float | None = None  # last successful JWKS fetch
        self._attempted_at: float | None = None  # last JWKS fetch, successful or not
        self._fetches = 0
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, header: str | None) -> Principal:
        if not header:
            raise _unauthorized("Missing admin token: send it as `Authorization: Bearer <JWT>`.")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN:
            raise _unauthorized("Malformed admin token: expected `Authorization: Bearer <JWT>`.")
        try:
            unverified = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthorized("Malformed admin token: not a JWT.") from None
        alg = unverified.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            shown = alg[:16] if isinstance(alg, str) else alg
            raise _unauthorized(f"The token's algorithm {shown!r} is not accepted here.")
        kid = unverified.get("kid")
        key = await self._key_for(alg, kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway,
                options={"require": self._required, "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("The admin token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise _unauthorized("The admin token is not valid yet (`nbf` or `iat` in the future).") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized(f"The admin token lacks the required `{exc.claim}` claim.") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized("The admin token's audience (`aud`) does not match.") from None
        except jwt.InvalidIssuerError:
            raise _unauthorized("The admin token's issuer (`iss`) does not match.") from None
        except jwt.InvalidSignatureError:
            raise _unauthorized("The admin token's signature does not verify.") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise _unauthorized(f"Invalid admin token ({type(exc).__name__}).") from None
        role = self._role(claims)
        if role is None:
            raise Forbidden(
                f"This token grants no admin API role: its `{self._config.role_claim}` claim must include "
                f"`{self._config.admin_role}` or `{self._config.viewer_role}`."
            )
        subject = claims.get("sub")
        return Principal(subject if isinstance(subject, str) else None, role)

    def _role(self, claims: dict[str, Any]) -> str | None:
        value: Any = claims
        for part in self._config.role_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            granted = set(value.split())
        elif isinstance(value, list):
            granted = {v for v in value if isinstance(v, str)}
        else:
            return None
        if self._config.admin_role in granted:
            return ADMIN
        if self._config.viewer_role in granted:
            return VIEWER
        return None

    async def _key_for(self, alg: str, kid: str | None) -> Any:
        if alg.startswith("HS"):
            return self._secret  # configured: `alg` passed the configured-algorithms check
        if self._config.jwks_url and (kid is not None or self._public_key is None):
            return await self._jwk(alg, kid)
        return self._public_key

    # --- JWKS -------------------------------------------------------------------------------

    async def _jwk(self, alg: str, kid: str | None) -> Any:
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._config.jwks_cache_seconds:
            await self._refresh(self._fetches)
        found = self._find(kid)
        if found is None and (self._attempted_at is None or self._clock() - self._attempted_at >= self._cooldown):
            await self._refresh(self._fetches)
            found = self._find(kid)
        if found is None:
            if self._fetched_at is None:
                raise VerifierUnavailable("The admin token's signing keys (JWKS) cannot be fetched; try again shortly.")
            raise _unauthorized("The admin token's signing key (`kid`) is unknown.")
        if found.alg is not None and found.alg != alg:
            raise _unauthorized("The admin token's algorithm does not match its signing key.")
        return found.key

    def _find(self, kid: str | None) -> _Jwk | None:
        if kid is not None:
            return self._jwks.get(kid)
        return next(iter(self._jwks.values())) if len(self._jwks) == 1 else None

    async def _refresh(self, seen: int) -> None:
        async with self._lock:
            if self._fetches != seen:  # another request fetched while this one waited
                return
            self._fetches += 1
            self._attempted_at = self._clock()
            try:
                keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("jwks_fetch_failed", url=self._config.jwks_url, error=str(exc)[:200])
                return
            self._jwks = keys
            self._fetched_at = self._clock()

    async def _fetch(self) -> dict[str | None, _Jwk]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._fetch_timeout))
        assert self._config.jwks_url is not None  # type narrowing: only a JWKS verifier fetches
        async with self._session.get(self._config.jwks_url, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = await resp.content.read(_MAX_JWKS_BYTES + 1)
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("JWKS document too large")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("JWKS document is not JSON") from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("JWKS document has no `keys` list")
        keys: dict[str | None, _Jwk] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
                continue  # symmetric keys are never taken from a JWKS; other kinds are not configured
            if entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry).key
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
            kid, jwk_alg = entry.get("kid"), entry.get("alg")
            keys[kid if isinstance(kid, str) else None] = _Jwk(key, jwk_alg if isinstance(jwk_alg, str) else None)
        return keys
