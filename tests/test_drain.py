"""SIGTERM drains the gateway process: not ready at once, no new connections, in-flight work
finishes within the grace period, streams past it end with an SSE error event, exit 0."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson
import pytest

from tests.conftest import GatewayProcess, auth, chat_body, create_key_in, write_gateway_config

pytestmark = pytest.mark.integration


async def _stream(
    http: aiohttp.ClientSession, url: str, key: str, tokens: int, interval_ms: int, started: asyncio.Event
) -> list[bytes]:
    headers = {**auth(key), "x-mock-tokens": str(tokens), "x-mock-interval-ms": str(interval_ms)}
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream=True), headers=headers) as resp:
        assert resp.status == 200
        started.set()
        body = await resp.read()
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


async def test_sigterm_drains_then_cuts_streams_past_the_grace(tmp_path, redis_url, mock_upstream):
    config = write_gateway_config(tmp_path / "gw.yaml", redis_url, mock_upstream, drain_grace_seconds=1.5)
    key = await create_key_in(redis_url, "drain")
    gateway = GatewayProcess(config)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as http:
            short_started, long_started = asyncio.Event(), asyncio.Event()
            short = asyncio.create_task(_stream(http, gateway.url, key, 5, 100, short_started))
            long = asyncio.create_task(_stream(http, gateway.url, key, 100, 100, long_started))
            await asyncio.wait_for(asyncio.gather(short_started.wait(), long_started.wait()), 10)
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            with pytest.raises(aiohttp.ClientConnectionError):  # the listener no longer accepts
                async with aiohttp.ClientSession() as fresh, fresh.get(gateway.url + "/readyz") as resp:
                    await resp.read()
            short_events = await short
            long_events = await long
            cut_after = time.monotonic() - signalled
        assert short_events[-1] == b"data: [DONE]\n\n"  # finished inside the grace period
        assert b"[DONE]" not in b"".join(long_events)
        error = orjson.loads(long_events[-1][6:])
        assert error["error"]["code"] == "draining"
        assert 1.3 < cut_after < 4.0
        assert len(long_events) > 10  # it had been streaming until the cut
        assert gateway.stop() == 0
    finally:
        gateway.stop()


async def test_new_requests_on_open_connections_get_503_draining(tmp_path, redis_url, mock_upstream):
    config = write_gateway_config(tmp_path / "gw.yaml", redis_url, mock_upstream, drain_grace_seconds=6)
    key = await create_key_in(redis_url, "drain")
    gateway = GatewayProcess(config)
    gateway.start()
    try:
        connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection for every request
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers=auth(key)) as r:
                assert r.status == 200
                await r.read()
            # Keep the process busy with a stream on another connection so that it stays up.
            async with aiohttp.ClientSession() as other:
                holder_started = asyncio.Event()
                holder = asyncio.create_task(_stream(other, gateway.url, key, 20, 100, holder_started))
                await asyncio.wait_for(holder_started.wait(), 10)
                gateway.process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:  # the keep-alive connection stays open
                    async with http.get(gateway.url + "/readyz") as resp:
                        if resp.status == 503:
                            assert "draining" in (await resp.json())["reasons"]
                            break
                    await asyncio.sleep(0.02)
                async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(),
                                     headers=auth(key)) as resp:  # fmt: skip
                    assert resp.status == 503
                    body = await resp.json()
                assert body["error"]["code"] == "draining"
                assert (await holder)[-1] == b"data: [DONE]\n\n"
        assert gateway.stop() == 0
    finally:
        gateway.stop()
