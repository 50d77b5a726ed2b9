"""Key changes reach every replica at once (issue: revocation everywhere within a second).

Two `python -m gateway serve` processes on one real Redis, with a 60 s key cache TTL so that
only the published event can explain a prompt 401: a key revoked, disabled or rotated through
one replica's admin API (or through the CLI) is refused by the other within 1 s. In process:
a change that was never published (a missed message) still takes effect within the cache TTL,
and the subscriber reconnects after its connection is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
import yaml

from gateway.keys.events import CHANNEL
from gateway.keys.records import KeyService
from gateway.store import names
from tests.conftest import GatewayFactory, GatewayProcess, auth
from tests.test_admin_jwt import AUDIENCE, SECRET, bearer, mint
from tests.test_cli import ok, run_cli


async def models_status(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.get(url + "/v1/models", headers=auth(key)) as resp:
        await resp.read()
        return resp.status


async def seconds_until(http: aiohttp.ClientSession, url: str, key: str, status: int, since: float,
                        limit: float = 3.0) -> float:  # fmt: skip
    """Poll every 10 ms until `key` gets `status` at `url`; the seconds since `since`."""
    while True:
        if await models_status(http, url, key) == status:
            return time.monotonic() - since
        if time.monotonic() - since > limit:
            raise AssertionError(f"{url} never answered {status} for that key within {limit} s")
        await asyncio.sleep(0.01)


async def admin_call(http: aiohttp.ClientSession, url: str, method: str, path: str, payload: object = None) -> dict:
    async with http.request(method, url + path, json=payload, headers=bearer(mint(iss=None))) as resp:
        assert resp.status in (200, 201), await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


async def test_two_replicas_revoke_within_a_second(
    redis_url: str, mock_upstream: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "redis_url": redis_url,
        "models": {"crimson-falcon-4": {"upstreams": [mock_upstream]}},
        "key_cache_ttl": 60,
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIUTONG_")}
    env.update({"LIUTONG_ADMIN_JWT_SECRET": SECRET, "LIUTONG_ADMIN_JWT_AUDIENCE": AUDIENCE, "PYTHONUNBUFFERED": "1"})
    a, b = GatewayProcess(config, env), GatewayProcess(config, env)
    a.env = b.env = env  # exactly this environment: no LIUTONG_* of the caller's
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    plaintexts = []
    try:
        # Revoked through A's admin API: B refuses it within a second.
        created = await admin_call(http, a.url, "POST", "/admin/keys", {"name": "svc"})
        key1 = created["key"]
        plaintexts.append(key1)
        for gw in (a, b):
            assert await models_status(http, gw.url, key1) == 200  # now cached by both, for 60 s
        started = time.monotonic()
        await admin_call(http, a.url, "POST", f"/admin/keys/{created['key_id']}/revoke")
        assert await seconds_until(http, b.url, key1, 401, started) < 1.0
        assert await models_status(http, a.url, key1) == 401

        # Made and revoked through the CLI; disabled and enabled through B's admin API.
        made = json.loads(ok(await asyncio.to_thread(
            run_cli, "keys", "create", "--name", "cli", "--json", redis_url=redis_url)).stdout)  # fmt: skip
        key2 = made["key"]
        plaintexts.append(key2)
        for gw in (a, b):
            assert await models_status(http, gw.url, key2) == 200
        started = time.monotonic()
        await admin_call(http, b.url, "POST", f"/admin/keys/{made['key_id']}/disable")
        assert await seconds_until(http, a.url, key2, 401, started) < 1.0
        started = time.monotonic()
        await admin_call(http, b.url, "POST", f"/admin/keys/{made['key_id']}/enable")
        assert await seconds_until(http, a.url, key2, 200, started) < 1.0
        ok(await asyncio.to_thread(run_cli, "keys", "revoke", made["key_id"], redis_url=redis_url))
        started = time.monotonic()
        assert await seconds_until(http, a.url, key2, 401, started) < 1.0
        assert await seconds_until(http, b.url, key2, 401, started) < 1.0

        # Rotated through B with no overlap: A refuses the old key at once and takes the new one.
        made = await admin_call(http, a.url, "POST", "/admin/keys", {"name": "rot"})
        plaintexts.append(made["key"])
        assert await models_status(http, a.url, made["key"]) == 200
        started = time.monotonic()
        rotated = await admin_call(http, b.url, "POST", f"/admin/keys/{made['key_id']}/rotate", {"overlap_seconds": 0})
        plaintexts.append(rotated["key"])
        assert await seconds_until(http, a.url, made["key"], 401, started) < 1.0
        assert await models_status(http, a.url, rotated["key"]) == 200
    finally:
        codes = await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))
    assert codes == [0, 0]
    for gw in (a, b):
        logs, stderr = gw.logs(), gw.stderr()
        assert "events_subscribed" in logs
        for plaintext in plaintexts:  # a plaintext key is never logged, not even by the admin API
            assert plaintext not in logs and plaintext not in stderr


async def test_a_missed_message_is_covered_by_the_cache_ttl(make_gateway: GatewayFactory,
                                                           http: aiohttp.ClientSession) -> None:  # fmt: skip
    gw = await make_gateway(key_cache_ttl=0.3)
    key, record = await gw.create_key("quiet")
    assert await models_status(http, gw.url, key) == 200
    # Revoked behind the services' back: no event is published.
    await gw.state.store.redis.hset(names.key_record(record.digest), "revoked_at", repr(time.time()))
    started = time.monotonic()
    assert await models_status(http, gw.url, key) == 200  # still the cached record
    assert await seconds_until(http, gw.url, key, 401, started) < 0.3 + 0.25


async def test_the_subscriber_reconnects(make_gateway: GatewayFactory, http: aiohttp.ClientSession,
                                         redis_url: str) -> None:  # fmt: skip
    gw = await make_gateway(key_cache_ttl=60.0)
    outside = aioredis.Redis.from_url(redis_url)  # as another replica or the CLI: only the channel links them
    try:
        assert (await outside.pubsub_numsub(CHANNEL))[0][1] == 1
        key, record = await gw.create_key("k")
        assert await models_status(http, gw.url, key) == 200
        await outside.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        deadline = time.monotonic() + 3
        while (await outside.pubsub_numsub(CHANNEL))[0][1] != 1:
            assert time.monotonic() < deadline, "the subscriber did not come back"
            await asyncio.sleep(0.02)
        started = time.monotonic()
        await KeyService(outside).revoke(record.key_id)
        assert await seconds_until(http, gw.url, key, 401, started) < 1.0
    finally:
        await outside.aclose()
