"""Caller identity to upstreams (issue item 5): a short-lived JWT the gateway signs per request,
per model, so that model servers can trust who is calling without ever seeing the `lt_` key.
The real mock upstream records what it received; the test verifies it with pyjwt."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import CallerJwt, ConfigError, parse_settings
from tests.conftest import GatewayFactory, auth, chat_body, gateway_settings
from tests.test_admin_jwt import SECRET, pem


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()  # fmt: skip


def test_caller_jwt_settings(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    key_file = tmp_path / "caller.pem"
    key_file.write_text(private_pem(ec_key))
    models = {
        "a": {"upstreams": ["http://u:1"],
              "caller_jwt": {"private_key_file": str(key_file), "ttl": 30, "key_id": "gw-1"}},
        "b": {"upstreams": ["http://u:2"], "caller_jwt": {"secret": SECRET, "header": "x-caller"}},
        "c": {"upstreams": ["http://u:3"]},
    }
    routes = parse_settings({"models": models}).models
    a, b = routes["a"].caller_jwt, routes["b"].caller_jwt
    assert a is not None and (a.algorithm, a.ttl, a.key_id, a.header) == ("ES256", 30.0, "gw-1", "x-liutong-caller")
    assert b is not None and (b.algorithm, b.header) == ("HS256", "x-caller")
    assert routes["c"].caller_jwt is None
    assert SECRET not in repr(routes) and "PRIVATE KEY" not in repr(routes)
    bad = {
        "secret": {"secret": "short"},
        "algorithm": {"algorithm": "none", "secret": SECRET},
        "private_key": {"algorithm": "ES256", "private_key": "nope"},
        "private_key_file": {"private_key_file": str(tmp_path / "missing.pem")},
        "header": {"secret": SECRET, "header": "Authorization"},
        "ttl": {"secret": SECRET, "ttl": 0},
        "colour": {"secret": SECRET, "colour": 1},
    }
    for field, section in bad.items():
        with pytest.raises(ConfigError, match=rf"models\.m\.caller_jwt\.{field}"):
            parse_settings({"models": {"m": {"upstreams": ["http://u:1"], "caller_jwt": section}}})
    with pytest.raises(ConfigError, match=r"RS256 needs an RSA key"):
        parse_settings({"models": {"m": {"upstreams": ["http://u:1"],
                                         "caller_jwt": {"algorithm": "RS256", "private_key": private_pem(ec_key)}}}})


async def test_upstreams_get_a_signed_caller_token_not_the_key(
    make_gateway: GatewayFactory, mock_upstream: str, redis_url: str, http: aiohttp.ClientSession,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:  # fmt: skip
    settings = gateway_settings(mock_upstream, redis_url)
    signed = CallerJwt(algorithm="ES256", private_key=private_pem(ec_key), ttl=30, key_id="gw-1")
    models = dict(settings.models)
    models["crimson-falcon-4"] = replace(models["crimson-falcon-4"], caller_jwt=signed)
    models["indigo-owl-4"] = replace(models["indigo-owl-4"], caller_jwt=CallerJwt(
        algorithm="HS256", secret=SECRET, header="x-caller", audience="owls", issuer="gw"))  # fmt: skip
    gw = await make_gateway(settings=replace(settings, models=models))
    key, record = await gw.create_key("caller", org="acme")

    async def received(model: str, request_id: str) -> dict[str, str]:
        headers = {**auth(key), "x-request-id": request_id, "x-liutong-caller": "forged", "x-caller": "forged"}
        async with http.post(gw.url + "/v1/chat/completions", json=chat_body(model), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(gw.upstream + "/mock/stats", params={"request_id": request_id}) as resp:
            stats = await resp.json()
        (seen,) = [r for r in stats["records"] if r["request_id"] == request_id]
        assert key not in str(seen)  # the upstream never sees the client's key
        return seen["headers"]  # type: ignore[no-any-return]

    headers = await received("crimson-falcon-4", "req-caller-1")
    token = headers["x-liutong-caller"]
    assert jwt.get_unverified_header(token)["kid"] == "gw-1"
    claims = jwt.decode(token, pem(ec_key), algorithms=["ES256"], audience="crimson-falcon-4",
                        issuer="liutong-gateway", options={"require": ["exp", "iat"]})  # fmt: skip
    assert (claims["key_id"], claims["sub"], claims["org"], claims["model"], claims["request_id"]) == (
        record.key_id, record.key_id, "acme", "crimson-falcon-4", "req-caller-1")
    assert claims["exp"] - claims["iat"] == 30

    headers = await received("indigo-owl-4", "req-caller-2")
    claims = jwt.decode(headers["x-caller"], SECRET, algorithms=["HS256"], audience="owls", issuer="gw")
    assert claims["model"] == "indigo-owl-4" and claims["request_id"] == "req-caller-2"
    # A model without `caller_jwt` gets no token of the gateway's.
    headers = await received("amber-phoenix-4", "req-caller-3")
    assert headers.get("x-liutong-caller") == "forged"  # the client's own, unsigned: worthless to verify
