"""Redis outages: fail_closed answers 503, fail_open serves on local per-replica limits, no
valid key ever becomes a 401, /readyz follows within a second, and recovery is automatic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from gateway.config import Limits
from tests.conftest import RedisServer, auth, chat_body, gateway_settings

CHAT = "/v1/chat/completions"
pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True)
    server.start()
    yield server
    server.stop()


async def _status(http, url: str, key: str, **body) -> tuple[int, dict]:
    async with http.post(url + CHAT, json=chat_body(**body), headers=auth(key)) as resp:
        return resp.status, await resp.json()


async def _ready(http, url: str) -> tuple[int, dict]:
    async with http.get(url + "/readyz") as resp:
        return resp.status, await resp.json()


async def _wait_for(predicate, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_fail_closed(make_gateway, mock_upstream, own_redis, http):
    gateway = await make_gateway(settings=gateway_settings(mock_upstream, own_redis.url))
    key, _ = await gateway.create_key("known")
    assert (await _status(http, gateway.url, key))[0] == 200  # now cached
    unseen, _ = await gateway.create_key("unseen")

    own_redis.stop()
    took = await _wait_for(lambda: _ready_is(http, gateway.url, 503), 1.5)
    assert took < 1.0
    status, body = await _ready(http, gateway.url)
    assert "store_unavailable" in body["reasons"]

    for candidate in (key, unseen):
        started = time.monotonic()
        status, body = await _status(http, gateway.url, candidate)
        assert status == 503, body
        assert body["error"]["type"] == "server_error"
        assert body["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 1.0  # never hangs on the dead store

    own_redis.start()
    took = await _wait_for(lambda: _ready_is(http, gateway.url, 200), 3)
    assert took < 1.5
    assert (await _status(http, gateway.url, key))[0] == 200
    assert (await _status(http, gateway.url, unseen))[0] == 200


async def _ready_is(http, url: str, status: int) -> bool:
    return (await _ready(http, url))[0] == status


async def test_fail_open_serves_known_keys_on_a_local_share_of_each_limit(make_gateway, mock_upstream, own_redis, http):
    settings = gateway_settings(
        mock_upstream, own_redis.url, store_outage_policy="fail_open", fail_open_share=0.25,
        limits=Limits(rpm=8, tpm=100_000, max_concurrent=10),
    )  # fmt: skip
    gateway = await make_gateway(settings=settings)
    key, _ = await gateway.create_key("known")
    assert (await _status(http, gateway.url, key))[0] == 200
    unseen, _ = await gateway.create_key("unseen")

    own_redis.stop()
    await _wait_for(lambda: _degraded(http, gateway.url), 1.5)
    statuses = [(await _status(http, gateway.url, key))[0] for _ in range(4)]
    assert statuses == [200, 200, 429, 429]  # 25 % of rpm 8 on this replica
    status, body = await _status(http, gateway.url, unseen)
    assert status == 503 and body["error"]["code"] == "store_unavailable"  # never a 401
    async with http.get(gateway.url + "/metrics") as resp:
        assert "liutong_store_degraded 1.0" in await resp.text()

    own_redis.start()
    await _wait_for(lambda: _ready_is(http, gateway.url, 200), 3)
    await _wait_for(lambda: _not_degraded(http, gateway.url), 3)
    async with http.get(gateway.url + "/metrics") as resp:
        assert "liutong_store_degraded 0.0" in await resp.text()
    assert (await _status(http, gateway.url, unseen))[0] == 200


async def _degraded(http, url: str) -> bool:
    status, body = await _ready(http, url)
    return status == 200 and body.get("store", "").startswith("degraded")


async def _not_degraded(http, url: str) -> bool:
    status, body = await _ready(http, url)
    return status == 200 and body.get("store") == "up"
