"""Admin API authentication (CONTRACT §9): tokens minted here with pyjwt, against a real gateway.

HS256 with a shared secret, RS256 and ES256 with a PEM public key, and a JWKS served on port 0
by a small aiohttp app. Every reject case answers 401 in the contract's error format, a valid
token without the role 403, a viewer reads but never writes, and with no verifier configured
every `/admin/` path is the contract's 404. The helpers here (`mint`, `hs_admin`, …) are shared
by the other admin tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.admin.verifier import JwtVerifier
from gateway.app import create_admin_app
from gateway.config import Admin, AdminJwt, ConfigError, Listen, load_settings, parse_settings
from gateway.errors import GatewayError
from gateway.state import STATE
from gateway.store import names
from tests.conftest import Gateway, GatewayFactory, free_port

SECRET = "hs-secret-for-tests-" + "x" * 44  # 64 bytes: long enough for HS512 too
OTHER_SECRET = "another-secret-" + "y" * 49
AUDIENCE = "liutong-admin"
ISSUER = "https://idp.example.test/"


def hs_admin(**overrides: Any) -> Admin:
    config: dict[str, Any] = {"audience": AUDIENCE, "algorithms": ("HS256",), "secret": SECRET, "issuer": ISSUER}
    config.update(overrides)
    return Admin(jwt=AdminJwt(**config))


def claims(role: Any = "admin", *, exp_in: float | None = 300, aud: Any = AUDIENCE, iss: str | None = ISSUER,
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "ops@example.test", "iat": now, **extra}
    if role is not None:
        payload["role"] = role
    if exp_in is not None:
        payload["exp"] = int(now + exp_in)
    if aud is not None:
        payload["aud"] = aud
    if iss is not None:
        payload["iss"] = iss
    return payload


def mint(role: Any = "admin", *, key: Any = SECRET, alg: str = "HS256", kid: str | None = None, **options: Any) -> str:
    return jwt.encode(claims(role, **options), key, algorithm=alg, headers={"kid": kid} if kid else None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """A token pyjwt would refuse to make: `alg: none`, or HS256 keyed with a public key's PEM."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest() if hmac_key else b""
    return f"{signing_input}.{_b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pem(private_key: Any) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None,
               **kwargs: Any) -> tuple[int, Any, Any]:  # fmt: skip
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers = {**bearer(token), **headers}
    async with http.request(method, url, headers=headers, **kwargs) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body, resp.headers


def assert_error(status: int, body: Any, expected_status: int, type_: str, code: str | None) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.fixture
async def admin_gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(admin=hs_admin())


# --- off unless configured ------------------------------------------------------------------


async def test_admin_api_is_404_without_a_verifier(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    for method, path in (("GET", "/admin/"), ("GET", "/admin/keys"), ("POST", "/admin/keys"),
                         ("GET", "/admin/openapi.json"), ("GET", "/admin/orgs/acme")):  # fmt: skip
        status, body, headers = await call(http, method, gateway.url + path, mint(), json={"name": "x"})
        assert_error(status, body, 404, "invalid_request_error", None)
        assert headers["x-request-id"]
    assert await gateway.state.store.redis.scard(names.KEY_IDS) == 0


# --- HS256: every reject case is a 401 ------------------------------------------------------


def _reject_cases(rsa_private: rsa.RSAPrivateKey) -> dict[str, tuple[str | None, str]]:
    """Case → (the Authorization header, a fragment of the 401's message saying why)."""
    viewer, admin = mint("viewer").split("."), mint("admin").split(".")
    return {
        "no header": (None, "Missing admin token"),
        "not bearer": ("Basic " + base64.b64encode(b"ops:pw").decode(), "Malformed"),
        "empty bearer": ("Bearer ", "Malformed"),
        "not a jwt": ("Bearer not-a-jwt", "not a JWT"),
        "alg none": ("Bearer " + jwt.encode(claims(), None, algorithm="none"), "algorithm 'none'"),  # type: ignore[arg-type]
        "alg None by hand": ("Bearer " + hand_made({"alg": "None", "typ": "JWT"}, claims()), "algorithm 'None'"),
        "alg none, signed anyway": ("Bearer " + hand_made({"alg": "none"}, claims(), SECRET.encode()), "'none'"),
        "no alg": ("Bearer " + hand_made({"typ": "JWT"}, claims(), SECRET.encode()), "algorithm None"),
        "HS512 not configured": ("Bearer " + mint(alg="HS512"), "algorithm 'HS512'"),
        "RS256 not configured": ("Bearer " + mint(key=rsa_private, alg="RS256"), "algorithm 'RS256'"),
        "wrong secret": ("Bearer " + mint(key=OTHER_SECRET), "signature"),
        "payload swapped": ("Bearer " + ".".join([viewer[0], admin[1], viewer[2]]), "signature"),
        "signature stripped": ("Bearer " + ".".join(admin[:2]) + ".", "signature"),
        "expired": ("Bearer " + mint(exp_in=-120), "expired"),
        "wrong audience": ("Bearer " + mint(aud="someone-else"), "audience"),
        "wrong audience list": ("Bearer " + mint(aud=["a", "b"]), "audience"),
        "no exp": ("Bearer " + mint(exp_in=None), "`exp`"),
        "no aud": ("Bearer " + mint(aud=None), "`aud`"),
        "wrong issuer": ("Bearer " + mint(iss="https://evil.example.test/"), "issuer"),
        "no issuer": ("Bearer " + mint(iss=None), "`iss`"),
        "not yet valid": ("Bearer " + mint(nbf=int(time.time()) + 600), "not valid yet"),
    }


async def test_every_bad_token_is_a_401(
    admin_gateway: Gateway, http: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    for case, (header, why) in _reject_cases(rsa_key).items():
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys")):
            headers = {"Authorization": header} if header is not None else {}
            status, body, resp_headers = await call(http, method, admin_gateway.url + path, headers=headers,
                                                    json={"name": case})  # fmt: skip
            assert status == 401, (case, body)
            assert_error(status, body, 401, "invalid_request_error", "invalid_token")
            assert why in body["error"]["message"], (case, body)
            assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    # Nothing was created by any of them.
    assert await admin_gateway.state.store.redis.scard(names.KEY_IDS) == 0


async def test_good_tokens_within_leeway_and_audience_lists_are_accepted(
    admin_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    for token in (mint(), mint(exp_in=-10), mint(aud=["other", AUDIENCE]), mint(nbf=int(time.time()) + 5)):
        status, body, _ = await call(http, "GET", admin_gateway.url + "/admin/", token)
        assert status == 200, body
        assert body == {"object": "admin", "subject": "ops@example.test", "role": "admin",
                        "openapi": "/admin/openapi.json"}  # fmt: skip


async def test_roles_admin_writes_viewer_reads_none_is_403(admin_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    url = admin_gateway.url
    for role in (None, "", "nobody", ["nobody"], {"admin": True}, 7):
        status, body, _ = await call(http, "GET", url + "/admin/keys", mint(role))
        assert_error(status, body, 403, "permission_error", "insufficient_role")
        assert "`role`" in body["error"]["message"]
    viewer = mint("viewer")
    status, body, _ = await call(http, "GET", url + "/admin/keys", viewer)
    assert status == 200 and body["data"] == []
    writes = (("POST", "/admin/keys", {"name": "v"}), ("POST", "/admin/orgs", {"org": "acme"}),
              ("PATCH", "/admin/orgs/acme", {"rpm": 1}), ("PATCH", "/admin/keys/key_x", {"rpm": 1}),
              ("POST", "/admin/keys/key_x/revoke", None), ("POST", "/admin/keys/key_x/rotate", None),
              ("POST", "/admin/keys/key_x/disable", None), ("POST", "/admin/keys/key_x/enable", None))  # fmt: skip
    for method, path, payload in writes:
        status, body, _ = await call(http, method, url + path, viewer, json=payload)
        assert_error(status, body, 403, "permission_error", "insufficient_role")
    assert await admin_gateway.state.store.redis.scard(names.KEY_IDS) == 0
    assert await admin_gateway.state.store.redis.scard(names.ORGS) == 0
    # Admin implies viewer; a list or a space-separated string of roles works too.
    for role in ("admin", ["viewer", "admin"], "viewer admin", ["admin"]):
        status, body, _ = await call(http, "POST", url + "/admin/keys", mint(role), json={"name": "a"})
        assert status == 201, body
    status, body, _ = await call(http, "GET", url + "/admin/", mint(["x", "viewer"]))
    assert status == 200 and body["role"] == "viewer"


async def test_role_claim_path_and_role_names_are_configurable(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(admin=hs_admin(role_claim="realm_access.roles", admin_role="lt-admin",
                                           viewer_role="lt-read", issuer=None))  # fmt: skip
    token = jwt.encode({**claims(None, iss=None), "realm_access": {"roles": ["lt-read"]}}, SECRET, algorithm="HS256")
    status, body, _ = await call(http, "GET", gw.url + "/admin/", token)
    assert status == 200 and body["role"] == "viewer"
    token = jwt.encode({**claims(None, iss=None), "realm_access": {"roles": ["lt-admin"]}}, SECRET, algorithm="HS256")
    status, body, _ = await call(http, "GET", gw.url + "/admin/", token)
    assert status == 200 and body["role"] == "admin"
    status, body, _ = await call(http, "GET", gw.url + "/admin/", mint("admin", iss=None))
    assert_error(status, body, 403, "permission_error", "insufficient_role")


# --- RS256 / ES256 with a PEM public key ----------------------------------------------------


async def test_rs256_and_es256_public_keys(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey,
) -> None:  # fmt: skip
    rs = await make_gateway(admin=Admin(jwt=AdminJwt(audience=AUDIENCE, algorithms=("RS256",),
                                                     public_key=pem(rsa_key))))  # fmt: skip
    status, body, _ = await call(http, "GET", rs.url + "/admin/", mint(key=rsa_key, alg="RS256", iss=None))
    assert status == 200 and body["role"] == "admin"
    public_pem = pem(rsa_key).encode()
    for token in (
        mint(key=other_rsa_key, alg="RS256"),  # signed by someone else
        mint(key=rsa_key, alg="RS512"),  # not a configured algorithm
        mint(key=rsa_key, alg="PS256"),
        mint(key=ec_key, alg="ES256"),
        mint(key=SECRET, alg="HS256"),
        # The classic confusion: HS256 keyed with the RSA public key, which the attacker knows.
        hand_made({"alg": "HS256", "typ": "JWT"}, claims(), public_pem),
        hand_made({"alg": "RS256", "typ": "JWT"}, claims(), public_pem),
    ):
        status, body, _ = await call(http, "GET", rs.url + "/admin/", token)
        assert_error(status, body, 401, "invalid_request_error", "invalid_token")

    # Both an HMAC secret and a public key: each algorithm family verifies with its own key only.
    both = await make_gateway(admin=Admin(jwt=AdminJwt(audience=AUDIENCE, algorithms=("HS256", "RS256"),
                                                       secret=SECRET, public_key=pem(rsa_key))))  # fmt: skip
    for token, expected in ((mint(), 200), (mint(key=rsa_key, alg="RS256"), 200),
                            (hand_made({"alg": "HS256"}, claims(), public_pem), 401)):  # fmt: skip
        status, body, _ = await call(http, "GET", both.url + "/admin/", token)
        assert status == expected, body

    es = await make_gateway(admin=Admin(jwt=AdminJwt(audience=AUDIENCE, algorithms=("ES256",), public_key=pem(ec_key))))
    status, body, _ = await call(http, "GET", es.url + "/admin/", mint("viewer", key=ec_key, alg="ES256"))
    assert status == 200 and body["role"] == "viewer"
    status, body, _ = await call(http, "GET", es.url + "/admin/", mint(key=rsa_key, alg="RS256"))
    assert_error(status, body, 401, "invalid_request_error", "invalid_token")
    status, body, _ = await call(http, "GET", es.url + "/admin/", mint(key=ec_key, alg="ES256", exp_in=-100))
    assert_error(status, body, 401, "invalid_request_error", "invalid_token")


# --- JWKS -----------------------------------------------------------------------------------


class Jwks:
    """An identity provider's JWKS endpoint on port 0, whose keys a test may change."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.url = ""

    def add(self, private_key: Any, kid: str, alg: str | None = None) -> None:
        is_rsa = isinstance(private_key, rsa.RSAPrivateKey)
        algorithm: Any = jwt.algorithms.RSAAlgorithm if is_rsa else jwt.algorithms.ECAlgorithm
        entry = json.loads(algorithm.to_jwk(private_key.public_key()))
        entry.update({"kid": kid, "use": "sig", **({"alg": alg} if alg else {})})
        self.keys.append(entry)

    async def handler(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks() -> AsyncIterator[Jwks]:
    idp = Jwks()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", idp.handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    idp.url = f"http://127.0.0.1:{runner.addresses[0][1]}/.well-known/jwks.json"
    yield idp
    await runner.cleanup()


def jwks_admin(url: str) -> AdminJwt:
    return AdminJwt(audience=AUDIENCE, algorithms=("RS256", "ES256"), jwks_url=url, issuer=ISSUER)


async def test_jwks_keys_by_kid(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, jwks: Jwks, rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey,
) -> None:  # fmt: skip
    jwks.add(rsa_key, "rsa-1", "RS256")
    jwks.add(ec_key, "ec-1")
    jwks.keys.append({"kty": "oct", "k": _b64(SECRET.encode()), "kid": "hmac-1"})  # never taken from a JWKS
    gw = await make_gateway(admin=Admin(jwt=jwks_admin(jwks.url)))
    url = gw.url + "/admin/"
    status, body, _ = await call(http, "GET", url, mint(key=rsa_key, alg="RS256", kid="rsa-1"))
    assert status == 200 and body["role"] == "admin"
    status, body, _ = await call(http, "GET", url, mint("viewer", key=ec_key, alg="ES256", kid="ec-1"))
    assert status == 200 and body["role"] == "viewer"
    assert jwks.fetches == 1  # cached
    for token in (
        mint(key=other_rsa_key, alg="RS256", kid="rsa-1"),  # the kid of a known key, signed by another
        mint(key=rsa_key, alg="RS256", kid="unknown"),
        mint(key=rsa_key, alg="RS256"),  # no kid, and the set has more than one key
        mint(key=ec_key, alg="ES256", kid="rsa-1"),  # the key's own `alg` is RS256
        mint(key=SECRET, alg="HS256", kid="hmac-1"),
        mint(key=rsa_key, alg="RS256", kid="rsa-1", aud="other"),
        mint(key=rsa_key, alg="RS256", kid="rsa-1", exp_in=-300),
    ):
        status, body, _ = await call(http, "GET", url, token)
        assert_error(status, body, 401, "invalid_request_error", "invalid_token")
    # Unknown kids make the verifier fetch again at most once per cooldown (1 s after the last
    # fetch), however many arrive: all of these came within it.
    assert jwks.fetches == 1


async def test_jwks_unreachable_is_503_not_401(make_gateway: GatewayFactory, http: aiohttp.ClientSession,
                                               rsa_key: rsa.RSAPrivateKey) -> None:  # fmt: skip
    gw = await make_gateway(admin=Admin(jwt=jwks_admin(f"http://127.0.0.1:{free_port()}/jwks.json")))
    status, body, _ = await call(http, "GET", gw.url + "/admin/", mint(key=rsa_key, alg="RS256", kid="k"))
    assert_error(status, body, 503, "server_error", "jwks_unavailable")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_refreshed_on_unknown_kid_and_on_its_ttl(
    jwks: Jwks, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = FakeClock()
    jwks.add(rsa_key, "old")
    verifier = JwtVerifier(jwks_admin(jwks.url), clock=clock, refresh_cooldown=1.0)
    try:
        assert (await verifier.verify("Bearer " + mint(key=rsa_key, alg="RS256", kid="old"))).role == "admin"
        assert jwks.fetches == 1
        # The identity provider rotates: a token with the new kid makes the verifier fetch again,
        # but not within the cooldown of the previous fetch.
        jwks.add(other_rsa_key, "new")
        new_token = "Bearer " + mint(key=other_rsa_key, alg="RS256", kid="new")
        with pytest.raises(GatewayError) as denied:
            await verifier.verify(new_token)
        assert denied.value.status == 401 and jwks.fetches == 1
        clock.now += 1.5
        assert (await verifier.verify(new_token)).role == "admin"
        assert jwks.fetches == 2
        for i in range(20):  # random kids do not turn into fetches
            with pytest.raises(GatewayError):
                await verifier.verify("Bearer " + mint(key=rsa_key, alg="RS256", kid=f"random-{i}"))
        assert jwks.fetches == 2
        # The old key is withdrawn: after the cache TTL the set is fetched again and it fails.
        jwks.keys = [k for k in jwks.keys if k["kid"] != "old"]
        old_token = "Bearer " + mint(key=rsa_key, alg="RS256", kid="old")
        assert (await verifier.verify(old_token)).role == "admin"
        clock.now += 301
        with pytest.raises(GatewayError) as denied:
            await verifier.verify(old_token)
        assert denied.value.status == 401 and jwks.fetches == 3
    finally:
        await verifier.close()


# --- configuration and the separate admin listener -------------------------------------------


def test_admin_settings_from_the_environment_and_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    settings = load_settings(None, {
        "LIUTONG_ADMIN_JWT_SECRET": SECRET, "LIUTONG_ADMIN_JWT_AUDIENCE": AUDIENCE,
        "LIUTONG_ADMIN_JWT_ISSUER": ISSUER, "LIUTONG_ADMIN_JWT_ALGORITHMS": "HS256,HS512",
        "LIUTONG_ADMIN_JWT_ROLE_CLAIM": "groups", "LIUTONG_ADMIN_JWT_LEEWAY": "10",
        "LIUTONG_ADMIN_ROTATION_OVERLAP": "600",
    })  # fmt: skip
    config = settings.admin.jwt
    assert config is not None
    assert (config.algorithms, config.audience, config.issuer, config.role_claim, config.leeway) == (
        ("HS256", "HS512"), AUDIENCE, ISSUER, "groups", 10.0)
    assert settings.admin.rotation_overlap == 600.0
    assert SECRET not in repr(settings)
    assert parse_settings({}).admin.jwt is None

    key_file = tmp_path / "admin.pem"
    key_file.write_text(pem(rsa_key))
    config = parse_settings({"admin": {"jwt": {"public_key_file": str(key_file), "audience": "a"}}}).admin.jwt
    assert config is not None and config.algorithms == ("RS256",) and config.public_key == pem(rsa_key)

    bad = {
        "admin.jwt.audience": {"secret": SECRET},
        "admin.jwt: set secret": {"audience": "a"},
        "admin.jwt.secret": {"secret": "short", "audience": "a"},
        "admin.jwt.algorithms": {"secret": SECRET, "audience": "a", "algorithms": ["none"]},
        "admin.jwt.public_key_file": {"public_key_file": str(tmp_path / "missing.pem"), "audience": "a"},
        "admin.jwt.jwks_url": {"jwks_url": "ftp://idp/jwks", "audience": "a"},
        "admin.jwt.colour": {"secret": SECRET, "audience": "a", "colour": "red"},
    }
    for field, section in bad.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_settings({"admin": {"jwt": section}})
    with pytest.raises(ConfigError, match=r"admin\.jwt\.secret"):
        parse_settings({"admin": {"jwt": {"secret": "z" * 40, "audience": "a", "algorithms": ["HS512"]}}})
    key_file.write_text("not a key")
    with pytest.raises(ConfigError, match=r"admin\.jwt\.public_key_file"):
        parse_settings({"admin": {"jwt": {"public_key_file": str(key_file), "audience": "a"}}})


async def test_admin_listener_moves_admin_off_the_main_port(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(admin=hs_admin(), admin_listen=Listen(host="127.0.0.1", port=0))
    status, body, _ = await call(http, "GET", gw.url + "/admin/", mint())
    assert_error(status, body, 404, "invalid_request_error", None)
    main = web.Application()
    main[STATE] = gw.state
    runner = web.AppRunner(create_admin_app(main), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        admin_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        status, body, _ = await call(http, "GET", admin_url + "/admin/", mint("viewer"))
        assert status == 200 and body["role"] == "viewer"
        status, body, _ = await call(http, "GET", admin_url + "/admin/keys")
        assert_error(status, body, 401, "invalid_request_error", "invalid_token")
    finally:
        await runner.cleanup()

