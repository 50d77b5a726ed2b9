"""Usage records as the gateway makes them (in-process gateway, real `redis-server`, the mock
upstream): where the counts come from for each kind of answer, the `liutong_usage_spool_records`
gauge and `liutong_tokens_total` through an outage, and the usage settings.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_settings
from gateway.store import names
from gateway.usage.records import UsageRecord
from tests.conftest import Gateway, GatewayFactory, auth, chat_body, gateway_settings
from tests.test_usage_writer import PersistentRedis, durable_redis, persistent_redis  # noqa: F401

CHAT = "/v1/chat/completions"


async def records(gateway: Gateway) -> dict[str, UsageRecord]:
    await gateway.settled()
    entries = await gateway.state.store.redis.xrange(names.USAGE_STREAM)
    return {r.request_id: r for r in (UsageRecord.from_fields(raw) for _, raw in entries)}


async def post(http: aiohttp.ClientSession, gateway: Gateway, key: str, rid: str, body: dict[str, Any],
               **mock: str) -> bytes:  # fmt: skip
    headers = {**auth(key), "x-request-id": rid, **{f"x-mock-{k.replace('_', '-')}": v for k, v in mock.items()}}
    async with http.post(gateway.url + CHAT, json=body, headers=headers) as resp:
        return await resp.read()


async def test_where_the_counts_come_from(gateway: Gateway, key: str, http: aiohttp.ClientSession) -> None:
    body = chat_body(messages=[{"role": "user", "content": "Count me, exactly."}])  # prompt: 2 + 4 + 5
    await post(http, gateway, key, "json", body, tokens="7")
    await post(http, gateway, key, "json-no-usage", body, tokens="7", no_usage="1")
    await post(http, gateway, key, "stream", {**body, "stream": True}, tokens="9")
    await post(http, gateway, key, "stream-no-usage", {**body, "stream": True}, tokens="9", no_usage="1")
    await post(http, gateway, key, "stream-cut", {**body, "stream": True}, tokens="9", drop_after="4")
    await post(http, gateway, key, "failed", body, status="500")
    stats = {r["request_id"]: r for r in (await gateway.mock_stats())["records"]}
    got = await records(gateway)
    assert (got["json"].usage_source, got["json"].prompt_tokens, got["json"].completion_tokens) == ("upstream", 11, 7)
    # No usage in a JSON answer: ⌈characters / 4⌉ of the reply.
    reply_chars = len(_json_text(stats["json-no-usage"]))
    assert got["json-no-usage"].usage_source == "estimated"
    assert got["json-no-usage"].completion_tokens == (reply_chars + 3) // 4 and got["json-no-usage"].prompt_tokens == 11
    assert (got["stream"].usage_source, got["stream"].completion_tokens) == ("upstream", 9)
    assert (got["stream-no-usage"].usage_source, got["stream-no-usage"].completion_tokens) == ("estimated", 9)
    # The upstream cut the stream after the role event and 3 tokens: what was relayed, a 502.
    cut = got["stream-cut"]
    assert (cut.status, cut.usage_source, cut.prompt_tokens, cut.completion_tokens) == (502, "estimated", 11, 3)
    assert cut.completion_tokens == stats["stream-cut"]["completion_tokens"]
    failed = got["failed"]
    assert (failed.status, failed.prompt_tokens, failed.completion_tokens) == (500, 0, 0)
    assert all(r.key_id and r.model == "crimson-falcon-4" and r.duration_ms >= 0 for r in got.values())
    assert got["stream"].stream and not got["json"].stream


def _json_text(mock_record: dict[str, Any]) -> str:
    from gateway.mock.text import generate_tokens

    body = mock_record["body"]
    tokens = generate_tokens(body["model"], body["messages"][-1]["content"], mock_record["completion_tokens"])
    return "".join(text for text, _ in tokens)


async def test_a_client_gone_before_the_first_event_is_charged_its_prompt(
    gateway: Gateway, key: str, http: aiohttp.ClientSession
) -> None:
    """The upstream took the stream (200, headers sent) and the client left before any token:
    the prompt was processed, so it is charged; nothing was generated, so no completion."""
    body = chat_body(stream=True)
    headers = {**auth(key), "x-request-id": "early-leaver", "x-mock-first-event-delay-ms": "1500"}
    async with http.post(gateway.url + CHAT, json=body, headers=headers) as resp:
        assert resp.status == 200
        resp.close()
    deadline = time.monotonic() + 5
    while (await gateway.mock_stats())["cancelled"] < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    rec = (await records(gateway))["early-leaver"]
    assert (rec.status, rec.usage_source, rec.prompt_tokens, rec.completion_tokens) == (499, "estimated", 8, 0)


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


async def scrape(http: aiohttp.ClientSession, gateway: Gateway) -> str:
    async with http.get(gateway.url + "/metrics") as resp:
        return await resp.text()


async def test_spool_gauge_and_token_counters_through_an_outage(
    make_gateway: GatewayFactory, mock_upstream: str, durable_redis: PersistentRedis,  # noqa: F811
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:  # fmt: skip
    spool = tmp_path / "u.spool"
    settings = gateway_settings(mock_upstream, durable_redis.url, usage_spool_path=str(spool),
                                store_outage_policy="fail_open", fail_open_share=1.0)  # fmt: skip
    gateway = await make_gateway(settings)
    key, _ = await gateway.create_key()
    await post(http, gateway, key, "before", chat_body(), tokens="5")
    await gateway.settled()
    await asyncio.to_thread(durable_redis.stop)
    try:
        for i in range(12):
            await post(http, gateway, key, f"during-{i}", chat_body(), tokens="5")
        deadline = time.monotonic() + 5
        while gateway.state.usage.spooled < 12:
            assert time.monotonic() < deadline, gateway.state.usage.spooled
            await asyncio.sleep(0.05)
        text = await scrape(http, gateway)
        assert metric(text, "liutong_usage_spool_records") >= 12
        assert metric(text, "liutong_tokens_total") == 8 + 5  # spooled records are not counted yet
        assert len(spool.read_bytes().splitlines()) == 12
    finally:
        await asyncio.to_thread(durable_redis.start)
    await gateway.settled(timeout=10)
    text = await scrape(http, gateway)
    assert metric(text, "liutong_usage_spool_records") == 0
    assert metric(text, "liutong_tokens_total") == 13 * (8 + 5)  # counted once written, and only once
    assert len(await records(gateway)) == 13
    assert spool.stat().st_size == 0


def test_usage_settings(tmp_path: Path) -> None:
    defaults = load_settings(env={})
    assert (defaults.usage_spool_path, defaults.usage_spool_fsync, defaults.usage_spool_fsync_interval,
            defaults.usage_stream_maxlen) == ("liutong-usage.spool", "interval", 1.0, 10_000_000)  # fmt: skip
    config = tmp_path / "g.yaml"
    config.write_text("usage_spool_path: /var/lib/liutong/u.spool\nusage_spool_fsync: always\n"
                      "usage_stream_maxlen: 0\n")  # fmt: skip
    settings = load_settings(str(config), env={"LIUTONG_USAGE_SPOOL_FSYNC_INTERVAL": "0.25"})
    assert (settings.usage_spool_path, settings.usage_spool_fsync, settings.usage_spool_fsync_interval,
            settings.usage_stream_maxlen) == ("/var/lib/liutong/u.spool", "always", 0.25, 0)  # fmt: skip
    env = {"LIUTONG_USAGE_SPOOL_PATH": "/data/x.spool", "LIUTONG_USAGE_SPOOL_FSYNC": "never",
           "LIUTONG_USAGE_STREAM_MAXLEN": "5000"}  # fmt: skip
    settings = load_settings(str(config), env=env)
    assert (settings.usage_spool_path, settings.usage_spool_fsync, settings.usage_stream_maxlen) == (
        "/data/x.spool", "never", 5000)  # fmt: skip
    assert load_settings(env={"LIUTONG_USAGE_SPOOL_PATH": "off"}).usage_spool_path is None
    config.write_text("usage_spool_path: null\n")
    assert load_settings(str(config), env={}).usage_spool_path is None


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("usage_spool_fsync: sometimes\n", "usage_spool_fsync"),
        ("usage_spool_fsync_interval: 0\n", "usage_spool_fsync_interval"),
        ("usage_stream_maxlen: -1\n", "usage_stream_maxlen"),
        ("usage_stream_maxlen: lots\n", "usage_stream_maxlen"),
        ("usage_spool_path: 7\n", "usage_spool_path"),
        ("usage_spool_paht: x\n", "usage_spool_paht"),
    ],
)
def test_bad_usage_settings_name_their_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    config = tmp_path / "g.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError, match=field):
        load_settings(str(config), env={})
