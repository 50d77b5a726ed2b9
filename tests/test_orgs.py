"""Org-wide limits (CONTRACT §3, §5): the `orgs …` commands, and their enforcement.

Two keys of one org share its buckets: with `org rpm: 50`, 100 concurrent requests split
between them admit exactly 50, and a request the org's bucket denies debits none of the keys'
own buckets (one `acquire.lua` call checks them all). An org created or changed through the
CLI or the admin API applies on the next request, however long the org cache's TTL.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import pytest
import redis

from gateway.cli import main
from gateway.errors import StoreUnavailable
from gateway.keys.events import Event
from gateway.keys.orgs import OrgService
from gateway.store import names
from tests.conftest import Gateway, GatewayFactory, auth, chat_body
from tests.test_admin_jwt import bearer, hs_admin, mint
from tests.test_cli import ok, run_cli


def cli(capsys: pytest.CaptureFixture[str], redis_url: str, *args: str) -> tuple[int, str, str]:
    """`liutong-gateway …` in this process (fast); `test_orgs_commands` also runs it as a subprocess."""
    with pytest.raises(SystemExit) as exited:
        sys.exit(main([*args, "--redis-url", redis_url]))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def org_json(capsys: pytest.CaptureFixture[str], redis_url: str, *args: str) -> Any:
    code, out, err = cli(capsys, redis_url, "orgs", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_orgs_commands(redis_url: str, redis_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # As a user runs it: a subprocess.
    created = json.loads(ok(run_cli("orgs", "create", "acme", "--rpm", "50", "--tpm", "100000", "--json",
                                    redis_url=redis_url)).stdout)  # fmt: skip
    assert (created["org"], created["rpm"], created["tpm"]) == ("acme", 50, 100000)
    client: redis.Redis = redis_server.client()
    stored = client.hgetall(names.org_record("acme"))
    assert (stored[b"rpm"], stored[b"tpm"]) == (b"50", b"100000")  # what the limiter reads
    table = ok(run_cli("orgs", "list", redis_url=redis_url)).stdout.splitlines()
    assert table[0].split() == ["ORG", "RPM", "TPM"] and table[1].split() == ["acme", "50", "100000"]
    client.close()

    assert org_json(capsys, redis_url, "show", "acme") == created
    updated = org_json(capsys, redis_url, "update", "acme", "--tpm", "0")
    assert (updated["rpm"], updated["tpm"]) == (50, 0)
    assert cli(capsys, redis_url, "orgs", "create", "beta")[0] == 0
    assert [o["org"] for o in org_json(capsys, redis_url, "list")] == ["acme", "beta"]
    code, out, _ = cli(capsys, redis_url, "orgs", "list")
    assert code == 0 and out.splitlines()[2].split() == ["beta", "-", "-"]
    code, out, _ = cli(capsys, redis_url, "orgs", "show", "acme")
    assert code == 0 and out.splitlines()[1].split() == ["rpm", "50"]

    code, _, err = cli(capsys, redis_url, "orgs", "create", "acme")
    assert code == 1 and "exists" in err
    code, _, err = cli(capsys, redis_url, "orgs", "update", "nope", "--rpm", "1")
    assert code == 1 and "nope" in err
    for args, named in ((("create", "bad org"), "org"), (("create", "x", "--rpm", "-1"), "--rpm"),
                        (("update", "acme"), "--rpm"), (("show",), "org")):  # fmt: skip
        code, _, err = cli(capsys, redis_url, "orgs", *args)
        assert code == 2 and named in err, err
    code, _, err = cli(capsys, redis_url, "keys", "create", "--name", "n", "--org", "{o:x}")
    assert code == 2 and "--org" in err


async def _hit(http: aiohttp.ClientSession, gw: Gateway, key: str) -> tuple[int, dict[str, Any], Any]:
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=auth(key)) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def test_two_keys_share_the_org_limit_exactly(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(store_timeout=2.0)  # a test of accuracy: a slow CI machine must not cause 503s
    await OrgService(gw.state.store.redis).create("acme", rpm=50)
    # Each key's own limit (60/min) would admit all of its 50 requests: only the org's limits them.
    key_a, rec_a = await gw.create_key("a", org="acme", rpm=60, max_concurrent=0)
    key_b, rec_b = await gw.create_key("b", org="acme", rpm=60, max_concurrent=0)
    for key in (key_a, key_b):  # authenticated once (no limit is touched), so the burst hits the cache
        async with http.get(gw.url + "/v1/models", headers=auth(key)) as resp:
            assert resp.status == 200
    keys = [key_a, key_b] * 50
    started = time.monotonic()
    results = await asyncio.gather(*(_hit(http, gw, key) for key in keys))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 50 and statuses.count(429) == 50, statuses
    for status, headers, body in results:
        if status == 429:
            assert body["error"]["type"] == "requests" and body["error"]["code"] == "rate_limit_exceeded"
            assert "org" in body["error"]["message"] and "50" in body["error"]["message"]
            assert int(headers["Retry-After"]) >= 1 and headers["x-ratelimit-limit-requests"] == "50"
    accepted = {key: 0 for key in (key_a, key_b)}
    for key, (status, _, _) in zip(keys, results, strict=True):
        accepted[key] += status == 200
    # A denied request debited nothing: each key's own bucket lost exactly its accepted requests
    # (give or take the refill of 1 request per second since the first).
    tag = names.limit_tag(rec_a.key_id, "acme")
    refill = time.monotonic() - started + 0.5
    for key, record in ((key_a, rec_a), (key_b, rec_b)):
        level = float(await gw.state.store.redis.hget(names.key_bucket(tag, record.key_id, "rpm"), "level"))
        assert 60 - accepted[key] - 0.01 <= level <= 60 - accepted[key] + refill, (accepted, level)
    # And a key outside the org is not affected by it.
    other, _ = await gw.create_key("solo", rpm=1000)
    assert (await _hit(http, gw, other))[0] == 200


async def test_org_changes_apply_at_once_everywhere(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    """With a 60 s org cache TTL, only the published change can explain the immediate effect."""
    gw = await make_gateway(key_cache_ttl=60.0, admin=hs_admin())
    key, _ = await gw.create_key("a", org="acme", rpm=1000, max_concurrent=0)
    for _ in range(3):
        assert (await _hit(http, gw, key))[0] == 200  # no org record: no org limit (and that is cached)
    admin = bearer(mint())
    async with http.post(gw.url + "/admin/orgs", json={"org": "acme", "rpm": 2}, headers=admin) as resp:
        assert resp.status == 201
    assert [(await _hit(http, gw, key))[0] for _ in range(3)] == [200, 200, 429]
    async with http.patch(gw.url + "/admin/orgs/acme", json={"rpm": None}, headers=admin) as resp:
        assert resp.status == 200
    assert (await _hit(http, gw, key))[0] == 200
    # Through the CLI's service (another connection, as another process would): the same.
    await OrgService(gw.state.store.redis).update("acme", rpm=1)
    await asyncio.sleep(0.2)
    status, headers, _ = await _hit(http, gw, key)
    assert status == 429 and headers["x-ratelimit-limit-requests"] == "1"


@pytest.mark.parametrize("org", ["acme", "team.a-1", "A" * 64])
def test_org_names(org: str) -> None:
    from gateway.keys.orgs import valid_org

    assert valid_org(org)
    assert not valid_org(org + "}") and not valid_org("-" + org) and not valid_org("")


async def test_a_cold_org_is_read_once_per_burst_and_never_skipped(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make_gateway()
    await OrgService(gw.state.store.redis).create("acme", rpm=5)
    _, record = await gw.create_key("a", org="acme")
    redis_client = gw.state.store.redis
    real_hgetall = redis_client.hgetall
    reads: list[str] = []

    async def counted(name: Any) -> Any:
        reads.append(name)
        return await real_hgetall(name)

    monkeypatch.setattr(redis_client, "hgetall", counted)
    plans = await asyncio.gather(*(gw.state.plan_for(record) for _ in range(50)))
    assert reads == [names.org_record("acme")]
    assert all([b.scope for b in plan.buckets].count("org") == 1 for plan in plans)

    # The store fails and nothing is cached: a 503, never a plan without the org's buckets.
    async def failing(name: Any) -> Any:
        raise redis.exceptions.ConnectionError("store down")

    gw.state.forget(Event("org", "acme"))
    monkeypatch.setattr(redis_client, "hgetall", failing)
    with pytest.raises(StoreUnavailable):
        await gw.state.plan_for(record)
