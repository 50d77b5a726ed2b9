"""Keys never leak: not in a log line, an error body, a metric or a usage record (not even a
prefix longer than `lt_` + 4 characters)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from gateway.keys.records import KeyService
from gateway.store.client import open_store
from tests.conftest import SEED_MODELS, GatewayProcess, auth, chat_body

pytestmark = pytest.mark.integration


def _fragments(key: str) -> list[str]:
    """Every piece of the key longer than `lt_` + 4 characters that a leak could show."""
    return [key[:8], key[3:11], key[-8:], key]


async def test_no_key_appears_in_logs_errors_metrics_or_usage(tmp_path, redis_url, mock_upstream):
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({
        "redis_url": redis_url,
        "log_level": "debug",
        "key_cache_ttl": 0.2,
        "models": {m: {"upstreams": [mock_upstream]} for m in SEED_MODELS},
    }))  # fmt: skip
    store = open_store(redis_url)
    service = KeyService(store.redis)
    valid, _ = await service.create("valid", rpm=3)
    revoked, revoked_record = await service.create("revoked")
    unknown = "lt_" + "Zq9" * 14
    malformed = "lt_short" + "!" * 5
    gateway = GatewayProcess(config)
    gateway.start()
    bodies: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            async def call(key: str, **extra) -> None:
                async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(**extra),
                                     headers={**auth(key), "x-request-id": "r-" + key[-4:]}) as resp:  # fmt: skip
                    bodies.append(await resp.text())
                    bodies.append(str(dict(resp.headers)))

            for _ in range(5):  # the last two are rate limited
                await call(valid)
            await call(valid, stream=True)
            await call(valid, model="no-such-model")
            await call(revoked)
            await service.revoke(revoked_record.key_id)
            await asyncio.sleep(0.3)
            await call(revoked)
            await call(unknown)
            await call(malformed)
            async with http.get(gateway.url + "/v1/models", headers=auth(unknown)) as resp:
                bodies.append(await resp.text())
            async with http.get(gateway.url + "/metrics") as resp:
                metrics = await resp.text()
    finally:
        assert gateway.stop() == 0
    client = aioredis.Redis.from_url(redis_url)
    usage = str(await client.xrange("liutong:{usage}:records"))
    everything_in_redis = []
    async for name in client.scan_iter("*"):
        everything_in_redis.append(name.decode())
        kind = (await client.type(name)).decode()
        if kind == "hash":
            everything_in_redis.append(str(await client.hgetall(name)))
        elif kind == "string":
            everything_in_redis.append(str(await client.get(name)))
    await client.aclose()
    await store.close()

    logs = gateway.logs() + gateway.stderr()
    assert '"event":"request"' in logs  # the access log was written
    assert "lt_" not in gateway.logs()
    haystacks = {"logs": logs, "responses": "\n".join(bodies), "metrics": metrics, "usage": usage,
                 "redis": "\n".join(everything_in_redis)}  # fmt: skip
    for key in (valid, revoked, unknown, malformed):
        for fragment in _fragments(key):
            for where, text in haystacks.items():
                assert fragment not in text, f"a piece of a key ({fragment[:5]}…) leaked into {where}"


async def test_host_and_absolute_uri_cannot_redirect_the_gateway(gateway, key):
    """A request naming another host (Host header or absolute URI) still goes to the configured
    upstream only: the gateway is never an open proxy."""
    import asyncio as aio
    from urllib.parse import urlsplit

    port = urlsplit(gateway.url).port
    body = b'{"model":"crimson-falcon-4","messages":[{"role":"user","content":"hi"}]}'
    for target, host in ((b"http://169.254.169.254/v1/chat/completions", b"169.254.169.254"),
                         (b"/v1/chat/completions", b"evil.example:80")):  # fmt: skip
        reader, writer = await aio.open_connection("127.0.0.1", port)
        writer.write(b"POST " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: Bearer "
                     + key.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)  # fmt: skip
        await writer.drain()
        answer = await aio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    stats = await gateway.mock_stats()
    assert stats["requests"] == 2  # both reached the configured upstream, and only it
    for record in stats["records"]:
        assert record["authorization"] is False  # the client's key never went upstream
