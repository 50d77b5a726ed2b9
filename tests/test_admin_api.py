"""The admin API's routes (CONTRACT §9, §4), against a real gateway, Redis and mock upstream.

One client wraps every call: it finds the documented operation of the route it called, checks
that the answer's status is documented there and validates the body against that response's
schema, checks accepted request bodies against the documented request schema, and records the
operation. The walk-through covers keys (create, list with filters and pages, show, update,
disable/enable, rotate, revoke), orgs and usage, the error cases of each, and ends by checking
that every documented operation was exercised and that they are exactly the routes served.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from gateway.admin.openapi import document
from gateway.admin.routes import ROUTES
from tests.conftest import Gateway, GatewayFactory, auth, chat_body
from tests.test_admin_jwt import assert_error, bearer, hs_admin, mint
from tests.test_orgs import cli

KEY_RE = re.compile(r"lt_[A-Za-z0-9]{32,}")
SPEC = document()


def _schema(schema: dict[str, Any]) -> OAS31Validator:
    return OAS31Validator({**schema, "components": SPEC["components"]})


def _template(path: str) -> str:
    for template in SPEC["paths"]:
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            return template
    raise AssertionError(f"{path} is not documented")


class AdminClient:
    """Calls the admin API and holds every answer to the OpenAPI document."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.admin = mint("admin")
        self.viewer = mint("viewer")
        self.exercised: set[tuple[str, str]] = set()

    async def __call__(self, method: str, path: str, expect: int, *, json: Any = None, token: str | None = None,
                       **kwargs: Any) -> Any:  # fmt: skip
        token = token or (self.viewer if method == "GET" else self.admin)
        headers = {**bearer(token), **kwargs.pop("headers", {})}
        if json is not None:
            kwargs["json"] = json
        async with self.http.request(method, self.url + path, headers=headers, **kwargs) as resp:
            body = await resp.json(content_type=None)
            status, self.last_headers = resp.status, resp.headers
        assert status == expect, (method, path, status, body)
        operation = SPEC["paths"][_template(path.split("?")[0])][method.lower()]
        assert str(status) in operation["responses"], f"{method} {path}: {status} is not documented"
        _schema(operation["responses"][str(status)]["content"]["application/json"]["schema"]).validate(body)
        if status < 300:
            self.exercised.add((method, _template(path.split("?")[0])))
            if json is not None:  # what the route accepted, the document accepts too
                _schema(operation["requestBody"]["content"]["application/json"]["schema"]).validate(json)
        elif status == 400 and json is not None and "requestBody" in operation:
            with pytest.raises(ValidationError):  # and what it refused, the document refuses
                _schema(operation["requestBody"]["content"]["application/json"]["schema"]).validate(json)
        return body


@pytest.fixture
async def admin(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> tuple[AdminClient, Gateway]:
    gw = await make_gateway(admin=replace(hs_admin(), rotation_overlap=5.0))
    return AdminClient(http, gw.url), gw


async def chat(http: aiohttp.ClientSession, gw: Gateway, key: str, model: str = "crimson-falcon-4") -> int:
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(model), headers=auth(key)) as resp:
        await resp.read()
        return resp.status


def test_the_document_is_valid_openapi_and_lists_exactly_the_routes() -> None:
    validate_spec(SPEC)
    documented = {(m.upper(), p) for p, item in SPEC["paths"].items() for m in item if m != "parameters"}
    assert documented == {(method, path) for method, path, _, _ in ROUTES}
    for method, path, role, _ in ROUTES:
        assert SPEC["paths"][path][method.lower()]["x-required-role"] == role


async def test_orgs(admin: tuple[AdminClient, Gateway]) -> None:
    api, _ = admin
    org = await api("POST", "/admin/orgs", 201, json={"org": "acme", "rpm": 1000})
    assert org["org"] == "acme" and org["rpm"] == 1000 and org["tpm"] is None
    body = await api("POST", "/admin/orgs", 409, json={"org": "acme", "tpm": 5})
    assert body["error"]["code"] == "org_exists" and body["error"]["param"] == "org"
    await api("POST", "/admin/orgs", 201, json={"org": "beta.team-2", "rpm": None, "tpm": 50_000})
    for bad, param in (({"org": "bad org"}, "org"), ({"org": "{o:x}"}, "org"), ({}, "org"),
                       ({"org": "x", "rpm": -1}, "rpm"), ({"org": "x", "tpm": 1.5}, "tpm"),
                       ({"org": "x", "burst": 1}, "burst")):  # fmt: skip
        body = await api("POST", "/admin/orgs", 400, json=bad)
        assert body["error"]["param"] == param
    listing = await api("GET", "/admin/orgs", 200)
    assert [o["org"] for o in listing["data"]] == ["acme", "beta.team-2"]
    assert (await api("GET", "/admin/orgs/acme", 200)) == org
    body = await api("GET", "/admin/orgs/nope", 404)
    assert body["error"]["code"] == "org_not_found"
    updated = await api("PATCH", "/admin/orgs/acme", 200, json={"tpm": 9000})
    assert (updated["rpm"], updated["tpm"]) == (1000, 9000) and updated["updated_at"] >= org["updated_at"]
    updated = await api("PATCH", "/admin/orgs/acme", 200, json={"rpm": None})
    assert (updated["rpm"], updated["tpm"]) == (None, 9000)
    await api("PATCH", "/admin/orgs/nope", 404, json={"rpm": 1})
    await api("PATCH", "/admin/orgs/acme", 400, json={})
    await api("PATCH", "/admin/orgs/acme", 400, json={"org": "renamed"})
    await api("PATCH", "/admin/orgs/acme", 415, data=b'{"rpm": 1}', headers={"Content-Type": "text/plain"})


async def test_key_lifecycle(admin: tuple[AdminClient, Gateway], http: aiohttp.ClientSession,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    api, gw = admin
    assert (await api("GET", "/admin/", 200))["role"] == "viewer"
    assert await api("GET", "/admin/openapi.json", 200) == SPEC

    # Create: the plaintext once, never cached by a proxy.
    created = await api("POST", "/admin/keys", 201, json={
        "name": "svc-a", "org": "acme", "models": ["crimson-falcon-4"], "rpm": 100, "expires_in": 3600})  # fmt: skip
    assert api.last_headers["Cache-Control"] == "no-store"
    key_a, key_id = created.pop("key"), created["key_id"]
    assert KEY_RE.fullmatch(key_a)
    assert created["status"] == "active" and created["models"] == ["crimson-falcon-4"]
    assert created["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
    assert await chat(http, gw, key_a) == 200
    assert await chat(http, gw, key_a, "indigo-owl-4") == 404
    b = await api("POST", "/admin/keys", 201, json={"name": "svc-b", "org": None, "models": [], "tpm": 0})
    c = await api("POST", "/admin/keys", 201, json={"name": "svc-b", "org": "beta", "expires_at": time.time() + 60})
    assert b["org"] is None and b["tpm"] == 0 and c["org"] == "beta"

    for bad, param in (({}, "name"), ({"name": ""}, "name"), ({"name": "  "}, "name"), ({"name": 5}, "name"),
                       ({"name": "x", "key": "lt_" + "a" * 40}, "key"), ({"name": "x", "rpm": -1}, "rpm"),
                       ({"name": "x", "rpm": "5"}, "rpm"), ({"name": "x", "max_concurrent": True}, "max_concurrent"),
                       ({"name": "x", "models": "crimson-falcon-4"}, "models"), ({"name": "x", "models": [""]},
                       "models[0]"), ({"name": "x", "org": "a b"}, "org"), ({"name": "x", "expires_in": 0},
                       "expires_in"), ({"name": "x", "expires_in": 60, "expires_at": 1e10}, "expires_at")):  # fmt: skip
        body = await api("POST", "/admin/keys", 400, json=bad)
        assert body["error"]["param"] == param, (bad, body)
    await api("POST", "/admin/keys", 400, data=b"{not json", headers={"Content-Type": "application/json"})
    await api("POST", "/admin/keys", 400, json=["svc"])
    await api("POST", "/admin/keys", 400)
    await api("POST", "/admin/keys", 415, data=b'{"name": "x"}', headers={"Content-Type": "text/plain"})

    # List: filters and pages.
    listing = await api("GET", "/admin/keys", 200)
    assert [k["key_id"] for k in listing["data"]] == [key_id, b["key_id"], c["key_id"]]
    assert listing["has_more"] is False and listing["last_id"] == c["key_id"]
    assert all("key" not in k and "digest" not in k for k in listing["data"])
    assert [k["key_id"] for k in (await api("GET", "/admin/keys?org=acme", 200))["data"]] == [key_id]
    by_name = (await api("GET", "/admin/keys?name=svc-b", 200))["data"]
    assert [k["key_id"] for k in by_name] == [b["key_id"], c["key_id"]]
    assert [k["key_id"] for k in (await api("GET", "/admin/keys?name=svc-b&org=beta", 200))["data"]] == [c["key_id"]]
    assert (await api("GET", "/admin/keys?org=nobody", 200))["data"] == []
    seen, after = [], ""
    while True:
        page = await api("GET", f"/admin/keys?limit=2{after}", 200)
        seen += [k["key_id"] for k in page["data"]]
        if not page["has_more"]:
            break
        after = f"&after={page['last_id']}"
    assert seen == [key_id, b["key_id"], c["key_id"]]
    for query, param in (("limit=0", "limit"), ("limit=1001", "limit"), ("limit=x", "limit"),
                         ("after=key_nope", "after"), ("colour=red", "colour")):  # fmt: skip
        assert (await api("GET", f"/admin/keys?{query}", 400))["error"]["param"] == param

    # Show and update.
    shown = await api("GET", f"/admin/keys/{key_id}", 200)
    assert shown == listing["data"][0]
    assert (await api("GET", "/admin/keys/key_nope", 404))["error"]["code"] == "key_not_found"
    updated = await api("PATCH", f"/admin/keys/{key_id}", 200, json={
        "name": "svc-a2", "models": [], "rpm": None, "tpm": 5000, "max_concurrent": 3, "expires_at": None})  # fmt: skip
    assert (updated["name"], updated["models"], updated["rpm"], updated["tpm"], updated["max_concurrent"],
            updated["expires_at"]) == ("svc-a2", [], None, 5000, 3, None)  # fmt: skip
    assert await chat(http, gw, key_a, "indigo-owl-4") == 200  # the model list change applies at once
    await api("PATCH", f"/admin/keys/{key_id}", 400, json={})
    await api("PATCH", f"/admin/keys/{key_id}", 400, json={"disabled": "yes"})
    await api("PATCH", f"/admin/keys/{key_id}", 400, json={"revoked_at": 1})
    await api("PATCH", "/admin/keys/key_nope", 404, json={"rpm": 1})

    # Disable / enable: effective on the next request.
    assert (await api("POST", f"/admin/keys/{key_id}/disable", 200))["status"] == "disabled"
    assert await chat(http, gw, key_a) == 401
    assert (await api("POST", f"/admin/keys/{key_id}/enable", 200))["status"] == "active"
    assert await chat(http, gw, key_a) == 200
    assert (await api("PATCH", f"/admin/keys/{key_id}", 200, json={"disabled": True}))["disabled"] is True
    assert await chat(http, gw, key_a) == 401
    await api("POST", f"/admin/keys/{key_id}/enable", 200)
    await api("POST", "/admin/keys/key_nope/disable", 404)

    # Rotate: a new key now; the old one works for the overlap, then not.
    rotated = await api("POST", f"/admin/keys/{key_id}/rotate", 200, json={"overlap_seconds": 3600})
    key_a2, new_id = rotated.pop("key"), rotated["key_id"]
    assert api.last_headers["Cache-Control"] == "no-store"
    assert KEY_RE.fullmatch(key_a2) and key_a2 != key_a and new_id != key_id
    assert (rotated["name"], rotated["org"], rotated["tpm"], rotated["max_concurrent"]) == ("svc-a2", "acme", 5000, 3)
    assert rotated["previous"]["key_id"] == key_id and rotated["previous"]["status"] == "active"
    assert rotated["previous"]["revoked_at"] == pytest.approx(time.time() + 3600, abs=5)
    assert await chat(http, gw, key_a2) == 200 and await chat(http, gw, key_a) == 200
    body = await api("POST", f"/admin/keys/{key_id}/rotate", 409)
    assert body["error"]["code"] == "key_revoked"
    again = await api("POST", f"/admin/keys/{new_id}/rotate", 200, json={"overlap_seconds": 0})
    key_a3 = again.pop("key")
    assert again["previous"]["status"] == "revoked"
    assert await chat(http, gw, key_a2) == 401 and await chat(http, gw, key_a3) == 200
    default = await api("POST", f"/admin/keys/{again['key_id']}/rotate", 200)  # no body: the configured overlap
    assert default["previous"]["revoked_at"] == pytest.approx(time.time() + 5, abs=2)
    await api("POST", f"/admin/keys/{default['key_id']}/rotate", 400, json={"overlap_seconds": -1})
    await api("POST", "/admin/keys/key_nope/rotate", 404)

    # Revoke: at once, for good, idempotent; also cuts a rotation's overlap short.
    revoked = await api("POST", f"/admin/keys/{key_id}/revoke", 200)
    assert revoked["status"] == "revoked" and revoked["revoked_at"] <= time.time()
    assert await chat(http, gw, key_a) == 401
    assert (await api("POST", f"/admin/keys/{key_id}/revoke", 200))["revoked_at"] == revoked["revoked_at"]
    await api("POST", f"/admin/keys/{key_id}/enable", 200)
    assert await chat(http, gw, key_a) == 401  # enabling does not undo a revocation
    await api("POST", "/admin/keys/key_nope/revoke", 404)

    # No plaintext key ever reaches a log line.
    logged = capsys.readouterr()
    for plaintext in (key_a, key_a2, key_a3, default["key"]):
        assert plaintext not in logged.out and plaintext not in logged.err
    assert "admin_action" in logged.out and "key.rotate" in logged.out


async def test_usage(admin: tuple[AdminClient, Gateway], http: aiohttp.ClientSession) -> None:
    api, gw = admin
    a = await api("POST", "/admin/keys", 201, json={"name": "a", "org": "acme"})
    b = await api("POST", "/admin/keys", 201, json={"name": "b", "org": "acme"})
    for _ in range(3):
        assert await chat(http, gw, a["key"]) == 200
    assert await chat(http, gw, b["key"]) == 200
    await gw.settled()

    usage = await api("GET", f"/admin/usage?key_id={a['key_id']}", 200)
    assert usage["key_id"] == a["key_id"] and usage["org"] is None and usage["granularity"] == "hour"
    totals = usage["totals"]
    assert totals["requests"] == 3 and totals["errors"] == 0
    assert totals["total_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"] > 0
    assert sum(bucket["requests"] for bucket in usage["data"]) == 3
    # No pricing configured: no cost, every request counted as unpriced, the default currency.
    assert (usage["currency"], totals["cost_micros"], totals["unpriced"]) == ("USD", 0, 3)
    org = await api("GET", "/admin/usage?org=acme&since=2h&granularity=day", 200)
    assert org["org"] == "acme" and org["totals"]["requests"] == 4 and len(org["data"]) in (1, 2)
    now = time.time()
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 7200))
    window = await api("GET", f"/admin/usage?org=acme&since={int(now) - 60}&until={iso}", 200)
    assert window["totals"]["requests"] == 4
    past = await api("GET", "/admin/usage?org=acme&since=2020-01-01T00:00:00Z&until=2020-01-02T00:00:00Z", 200)
    assert past["totals"]["requests"] == 0 and past["data"] == []
    assert past["since"] == "2020-01-01T00:00:00Z" and past["until"] == "2020-01-02T00:00:00Z"
    for query, param in (("", "key_id"), (f"key_id={a['key_id']}&org=acme", "key_id"), ("org=acme&granularity=week",
                         "granularity"), ("org=acme&since=yesterday", "since"), ("org=acme&until=soon", "until"),
                         ("org=acme&since=1h&until=2h", "since"), ("org=acme&since=400d", "since"),
                         ("org=acme&format=csv", "format")):  # fmt: skip
        assert (await api("GET", f"/admin/usage?{query}", 400))["error"]["param"] == param


async def test_every_documented_operation_is_exercised(admin: tuple[AdminClient, Gateway],
                                                       http: aiohttp.ClientSession) -> None:  # fmt: skip
    """A compact pass over every operation (the tests above go deep), so that nothing documented
    is left unexercised by this module even when run alone."""
    api, gw = admin
    await api("GET", "/admin/", 200)
    await api("GET", "/admin/openapi.json", 200)
    await api("POST", "/admin/orgs", 201, json={"org": "acme", "rpm": 10})
    await api("GET", "/admin/orgs", 200)
    await api("GET", "/admin/orgs/acme", 200)
    await api("PATCH", "/admin/orgs/acme", 200, json={"tpm": 10})
    key = await api("POST", "/admin/keys", 201, json={"name": "k", "org": "acme"})
    path = f"/admin/keys/{key['key_id']}"
    await api("GET", "/admin/keys", 200)
    await api("GET", path, 200)
    await api("PATCH", path, 200, json={"rpm": 7})
    await api("POST", path + "/disable", 200)
    await api("POST", path + "/enable", 200)
    rotated = await api("POST", path + "/rotate", 200, json={"overlap_seconds": 0})
    await api("POST", f"/admin/keys/{rotated['key_id']}/revoke", 200)
    await api("GET", "/admin/usage?org=acme", 200)
    assert api.exercised == {(method, path) for method, path, _, _ in ROUTES}
    # The viewer token reads everything the document marks `viewer`, and nothing else.
    for method, route, role, _ in ROUTES:
        concrete = route.replace("{key_id}", key["key_id"]).replace("{org}", "acme")
        if method != "GET":
            assert role == "admin"
            async with http.request(method, gw.url + concrete, headers=bearer(api.viewer), json={}) as resp:
                assert_error(resp.status, await resp.json(), 403, "permission_error", "insufficient_role")


async def test_the_cli_and_the_api_agree(admin: tuple[AdminClient, Gateway], redis_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """One service layer: what one writes, the other shows, field for field."""
    api, _ = admin

    def cli_json(*args: str) -> Any:
        capsys.readouterr()  # the gateway's own log lines so far
        code, out, err = cli(capsys, redis_url, *args, "--json")
        assert code == 0, err
        return json.loads(out)

    created = await api("POST", "/admin/keys", 201, json={"name": "both", "org": "acme", "rpm": 9})
    created.pop("key")
    assert await asyncio.to_thread(cli_json, "keys", "show", created["key_id"]) == created
    rotated = await asyncio.to_thread(cli_json, "keys", "rotate", created["key_id"], "--overlap", "0")
    assert KEY_RE.fullmatch(rotated.pop("key"))
    assert await api("GET", f"/admin/keys/{rotated['key_id']}", 200) == rotated
    assert (await api("GET", f"/admin/keys/{created['key_id']}", 200))["status"] == "revoked"
    assert await api("POST", f"/admin/keys/{created['key_id']}/rotate", 409)
    capsys.readouterr()
    code, _, err = await asyncio.to_thread(cli, capsys, redis_url, "keys", "rotate", created["key_id"])
    assert code == 1 and "revoked or already rotated" in err

    org = await api("POST", "/admin/orgs", 201, json={"org": "acme", "rpm": 50})
    assert await asyncio.to_thread(cli_json, "orgs", "show", "acme") == org
    changed = await asyncio.to_thread(cli_json, "orgs", "update", "acme", "--tpm", "700")
    assert await api("GET", "/admin/orgs/acme", 200) == changed
    assert [o["org"] for o in await asyncio.to_thread(cli_json, "orgs", "list")] == ["acme"]
    listed = await asyncio.to_thread(cli_json, "keys", "list")
    assert listed == (await api("GET", "/admin/keys", 200))["data"]
