"""The admin API refuses bad input with the contract's error, never a 500 (issue 14).

Each case was a 500 once, or could have been: a null org on create (an `assert` in the
handler), instants that overflow or are not numbers, and a store that does not answer. The
calls go through `AdminClient`, which also holds every answer and every refused body to the
OpenAPI document.
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import quote

import aiohttp
import pytest

from tests.conftest import Gateway, GatewayFactory, free_port, gateway_settings
from tests.test_admin_api import AdminClient
from tests.test_admin_jwt import hs_admin


@pytest.fixture
async def admin(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> tuple[AdminClient, Gateway]:
    gw = await make_gateway(admin=replace(hs_admin(), rotation_overlap=5.0))
    return AdminClient(http, gw.url), gw


@pytest.mark.parametrize("org", [None, 0, "", [], {"org": "acme"}])
async def test_create_org_refuses_a_missing_org_name(admin: tuple[AdminClient, Gateway], org: object) -> None:
    api, _ = admin
    body = await api("POST", "/admin/orgs", 400, json={"org": org, "rpm": 0, "tpm": 0})
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "org"
    assert (await api("GET", "/admin/orgs", 200))["data"] == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "-5", "1e9", "999999999999d", "9" * 400 + "d",
                                   "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "٣d", "",
                                   "2026-11-25T10:00:00", "2026-11-25", "2026-13-01T00:00:00Z", "20261125T100000Z"])  # fmt: skip
async def test_usage_refuses_instants_it_cannot_represent(admin: tuple[AdminClient, Gateway], value: str) -> None:
    api, _ = admin
    for param in ("since", "until"):
        body = await api("GET", f"/admin/usage?org=acme&{param}={quote(value)}", 400)
        assert body["error"]["param"] == param, (value, body)


async def test_usage_takes_the_forms_it_documents(admin: tuple[AdminClient, Gateway]) -> None:
    api, _ = admin
    for since in (
        "1700000000",
        "1700000000.25",
        "2h",
        "2026-11-25T10:00:00Z",
        "2026-11-25t10:00:00.123456789z",
        "2026-11-25T10:00:00+05:30",
    ):
        await api("GET", f"/admin/usage?org=acme&granularity=day&since={quote(since)}", 200)


async def test_an_unreachable_store_is_a_503_not_a_500(make_gateway: GatewayFactory, mock_upstream: str,
                                                       http: aiohttp.ClientSession) -> None:  # fmt: skip
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gw = await make_gateway(gateway_settings(mock_upstream, dead, admin=hs_admin(), store_timeout=0.2))
    api = AdminClient(http, gw.url)
    for method, path, json in (("GET", "/admin/keys", None), ("POST", "/admin/keys", {"name": "a"}),
                               ("GET", "/admin/orgs/acme", None), ("POST", "/admin/orgs", {"org": "acme"}),
                               ("GET", "/admin/usage?org=acme", None)):  # fmt: skip
        body = await api(method, path, 503, json=json)
        assert body["error"]["code"] == "store_unavailable", (method, path, body)
