"""The admin document says exactly what the server takes (issue 14): each case a fuzzer found.

Each request goes through `AdminClient` (tests/test_admin_api.py), which checks that an accepted
body is valid under the documented schema and a refused one (400) is not; the query cases are
held to the documented parameter schemas here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS31Validator

from gateway.admin import bodies
from gateway.admin.fields import KEY_FIELDS, MAX_INT, ORG_FIELDS, Field
from gateway.admin.openapi import document
from tests.conftest import Gateway, GatewayFactory
from tests.test_admin_api import AdminClient
from tests.test_admin_jwt import hs_admin

SPEC = document()


def _valid(schema: dict[str, Any], value: Any) -> bool:
    try:
        OAS31Validator({**schema, "components": SPEC["components"]}).validate(value)
    except ValidationError:
        return False
    return True


def _param(path: str, name: str) -> dict[str, Any]:
    return next(p for p in SPEC["paths"][path]["get"]["parameters"] if p["name"] == name)


@pytest.fixture
async def admin(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> tuple[AdminClient, Gateway]:
    gw = await make_gateway(admin=replace(hs_admin(), rotation_overlap=5.0))
    return AdminClient(http, gw.url), gw


def test_the_bodies_take_exactly_the_documented_fields() -> None:
    schemas = SPEC["components"]["schemas"]
    assert tuple(schemas["KeyCreate"]["properties"]) == bodies.KEY_CREATE_FIELDS
    assert tuple(schemas["KeyUpdate"]["properties"]) == bodies.KEY_UPDATE_FIELDS
    assert tuple(schemas["OrgCreate"]["properties"]) == bodies.ORG_CREATE_FIELDS
    assert tuple(schemas["OrgUpdate"]["properties"]) == bodies.ORG_UPDATE_FIELDS
    assert schemas["KeyCreate"]["required"] == ["name"] and schemas["OrgCreate"]["required"] == ["org"]


def test_a_new_field_is_one_declaration() -> None:
    fields = {**KEY_FIELDS, "daily_tokens": Field("Tokens per day.", {"type": "integer"}, {"type": "integer"})}
    from gateway.admin.openapi import _answer, _body

    assert "daily_tokens" in _answer(fields)["properties"] and "daily_tokens" in _answer(fields)["required"]
    assert "daily_tokens" in _body(fields, "create")["properties"]
    assert "daily_tokens" in _body(fields, "update")["properties"]
    assert "daily_tokens" not in _answer(ORG_FIELDS)["properties"]


@pytest.mark.parametrize("value", [0.0, 5.0, MAX_INT])
async def test_whole_numbers_are_integers_as_json_schema_says(admin: tuple[AdminClient, Gateway], value: Any) -> None:
    api, _ = admin
    org = await api("POST", "/admin/orgs", 201, json={"org": "acme", "rpm": value, "tpm": value})
    assert org["rpm"] == int(value) and isinstance(org["rpm"], int)
    key = await api("POST", "/admin/keys", 201, json={"name": "k", "max_concurrent": value})
    assert key["max_concurrent"] == int(value)
    assert (await api("PATCH", f"/admin/keys/{key['key_id']}", 200, json={"rpm": value}))["rpm"] == int(value)


@pytest.mark.parametrize("value", [MAX_INT + 1, 2590596304496270770176, 0.5, -1, True, "5"])
async def test_out_of_range_limits_are_refused_by_both(admin: tuple[AdminClient, Gateway], value: Any) -> None:
    api, _ = admin
    body = await api("POST", "/admin/orgs", 400, json={"org": "acme", "rpm": value})
    assert body["error"]["param"] == "rpm"
    key = await api("POST", "/admin/keys", 201, json={"name": "k"})
    await api("PATCH", f"/admin/keys/{key['key_id']}", 400, json={"tpm": value})
    await api("PATCH", "/admin/orgs/acme", 404, json={"tpm": 1})


async def test_expires_in_and_expires_at_exclude_each_other(admin: tuple[AdminClient, Gateway]) -> None:
    api, _ = admin
    both = {"expires_in": 60, "expires_at": 4_000_000_000 // 2}
    await api("POST", "/admin/keys", 400, json={"name": "k", **both})
    key = await api("POST", "/admin/keys", 201, json={"name": "k", "expires_in": 60})
    await api("PATCH", f"/admin/keys/{key['key_id']}", 400, json=both)
    assert (await api("PATCH", f"/admin/keys/{key['key_id']}", 200, json={"expires_at": None}))["expires_at"] is None


async def test_the_keys_cursor_and_filters(admin: tuple[AdminClient, Gateway]) -> None:
    api, _ = admin
    after, org, name, limit = (_param("/admin/keys", n)["schema"] for n in ("after", "org", "name", "limit"))
    for bad in ("", "key_nope", "key_0123456789AB", "x"):
        assert not _valid(after, bad)
        assert (await api("GET", f"/admin/keys?after={bad}", 400))["error"]["param"] == "after"
    assert _valid(after, "key_0123456789ab")
    body = await api("GET", "/admin/keys?after=key_0123456789ab", 404)
    assert body["error"]["code"] == "key_not_found" and body["error"]["param"] == "after"
    for param, schema, bad in (("org", org, "bad org"), ("org", org, ""), ("name", name, ""), ("name", name, " ")):
        assert not _valid(schema, bad)
        assert (await api("GET", f"/admin/keys?{param}={bad}", 400))["error"]["param"] == param
    for bad in ("0", "1001", "+5", " 5", "5.0", "٣"):
        assert (await api("GET", f"/admin/keys?limit={bad}", 400))["error"]["param"] == "limit"
    assert _valid(limit, 1000) and not _valid(limit, 1001)
    await api("GET", "/admin/keys?limit=1000&org=acme&name=k", 200)


async def test_usage_takes_key_id_or_org_not_both(admin: tuple[AdminClient, Gateway]) -> None:
    api, _ = admin
    scope = _param("/admin/usage", "scope")
    assert scope["style"] == "form" and scope["explode"] is True  # `?key_id=…` or `?org=…` on the wire
    assert _valid(scope["schema"], {"org": "acme"}) and _valid(scope["schema"], {"key_id": "key_0123456789ab"})
    for bad in ({}, {"org": "acme", "key_id": "key_0123456789ab"}, {"org": "bad org"}, {"key_id": "k"}):
        assert not _valid(scope["schema"], bad)
    await api("GET", "/admin/usage?org=acme&key_id=key_0123456789ab", 400)
    await api("GET", "/admin/usage", 400)
    assert (await api("GET", "/admin/usage?org=bad%20org", 400))["error"]["param"] == "org"
    assert (await api("GET", "/admin/usage?key_id=k", 400))["error"]["param"] == "key_id"
    await api("GET", "/admin/usage?key_id=key_0123456789ab", 200)


def test_every_operation_documents_its_errors_in_the_contract_format() -> None:
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            codes = set(operation["responses"])
            assert {"401", "403", "503"} <= codes, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            for code, response in operation["responses"].items():
                if code >= "400":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)
