"""SSE through the gateway: incremental, byte-identical, usage hidden, cancels and cut streams."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from gateway.config import Timeouts
from gateway.store.names import concurrency_set, limit_tag
from tests.conftest import auth, chat_body, gateway_settings
from tests.raw_server import RawServer

CHAT = "/v1/chat/completions"


async def _events(resp) -> AsyncIterator[tuple[float, bytes]]:
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield time.monotonic(), event + b"\n\n"


async def test_events_arrive_as_the_upstream_sends_them(gateway, key, http):
    headers = {**auth(key), "x-mock-interval-ms": "200", "x-mock-tokens": "5"}
    started = time.monotonic()
    arrivals: list[float] = []
    async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        async for at, _ in _events(resp):
            arrivals.append(at - started)
    # role chunk, 5 tokens, finish chunk, [DONE]; the upstream spaces them 200 ms apart.
    assert len(arrivals) == 8
    assert arrivals[0] < 0.5
    assert arrivals[-1] > 1.0
    assert arrivals[-1] - arrivals[0] > 0.8


async def test_usage_chunk_is_hidden_unless_the_client_asked(gateway, key, http):
    async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=auth(key)) as resp:
        events = [e async for _, e in _events(resp)]
    assert events[-1] == b"data: [DONE]\n\n"
    payloads = [orjson.loads(e[6:]) for e in events[:-1]]
    assert all(p["choices"] for p in payloads)  # no usage-only chunk reached this client
    assert all("usage" not in p for p in payloads)  # nor the `"usage": null` include_usage adds
    stats = await gateway.mock_stats()
    assert stats["records"][-1]["body"]["stream_options"] == {"include_usage": True}

    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(gateway.url + CHAT, json=body, headers=auth(key)) as resp:
        events = [e async for _, e in _events(resp)]
    usage_chunk = orjson.loads(events[-2][6:])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 16


async def _fixed_upstream(chunks: list[bytes], *, pause: float = 0.0) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
            if pause:
                await asyncio.sleep(pause)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_events_are_relayed_byte_for_byte(make_gateway, redis_url, http):
    long_event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 300_000 + b'"}}]}\n\n'
    chunks = [
        b": a comment line\n\n",
        b'event: message\nid: 7\ndata: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        long_event[:1000],  # one event split over several reads
        long_event[1000:],
        b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\ndata: {"choices":[{"index":0,',
        b'"delta":{"content":"c"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    runner, upstream = await _fixed_upstream(chunks)
    try:
        gateway = await make_gateway(settings=gateway_settings(upstream, redis_url))
        key, _ = await gateway.create_key()
        body = chat_body(stream=True, stream_options={"include_usage": True})
        async with http.post(gateway.url + CHAT, json=body, headers=auth(key)) as resp:
            received = await resp.read()
        assert received == b"".join(chunks)
    finally:
        await runner.cleanup()


async def test_client_disconnect_cancels_upstream_and_releases_the_slot(gateway, http):
    key, record = await gateway.create_key("gone", max_concurrent=1)
    headers = {**auth(key), "x-mock-interval-ms": "200", "x-mock-tokens": "50", "x-request-id": "gone-1"}
    resp = await http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=headers)
    assert resp.status == 200
    seen = 0
    async for _, _event in _events(resp):
        seen += 1
        if seen == 3:
            break
    resp.close()  # the client goes away mid-stream
    closed_at = time.monotonic()

    deadline = closed_at + 2
    while time.monotonic() < deadline:
        stats = await gateway.mock_stats()
        if stats["cancelled"] == 1:
            break
        await asyncio.sleep(0.05)
    record_seen = next(r for r in stats["records"] if r["request_id"] == "gone-1")
    assert record_seen["outcome"] == "cancelled"
    assert record_seen["cancelled_at"] - closed_at < 1.0 or stats["cancelled"] == 1

    await gateway.settled()
    tag = limit_tag(record.key_id, None)
    assert await gateway.state.store.redis.zcard(concurrency_set(tag, record.key_id)) == 0
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as again:
        assert again.status == 200

    # The tokens streamed before the cancel are recorded, never the whole max_tokens, never zero.
    entries = await gateway.state.store.redis.xrange("liutong:{usage}:records")
    fields = next({k.decode(): v.decode() for k, v in e[1].items()} for e in entries
                  if e[1][b"request_id"] == b"gone-1")  # fmt: skip
    assert fields["status"] == "499"
    assert fields["usage_source"] == "estimated"
    emitted = record_seen["completion_tokens"]
    assert 1 <= int(fields["completion_tokens"]) <= emitted
    assert emitted < 50


async def test_upstream_dropping_mid_stream_ends_with_an_error_event(gateway, key, http):
    headers = {**auth(key), "x-mock-drop-after": "3", "x-mock-tokens": "10"}
    async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=headers) as resp:
        assert resp.status == 200
        events = [e async for _, e in _events(resp)]
    assert b"[DONE]" not in b"".join(events)
    error = orjson.loads(events[-1][6:])
    assert error["error"]["type"] == "upstream_error"
    assert error["error"]["code"] == "upstream_unavailable"
    assert len(events) == 4  # three relayed events, then the error


@pytest.mark.parametrize("stream", [True, False])
async def test_first_byte_timeout_is_a_504(make_gateway, http, stream):
    gateway = await make_gateway(timeouts=Timeouts(connect=1, first_byte=0.3, idle=0.3, total=5))
    key, _ = await gateway.create_key()
    headers = {**auth(key), "x-mock-delay-ms": "2000"}
    started = time.monotonic()
    async with http.post(gateway.url + CHAT, json=chat_body(stream=stream), headers=headers) as resp:
        assert resp.status == 504
        body = await resp.json()
    assert time.monotonic() - started < 1.5
    assert body["error"] == {"message": body["error"]["message"], "type": "upstream_error", "param": None,
                             "code": "upstream_timeout"}  # fmt: skip


async def test_idle_stream_ends_with_a_timeout_event(make_gateway, http):
    gateway = await make_gateway(timeouts=Timeouts(connect=1, first_byte=2, idle=0.3, total=5))
    key, _ = await gateway.create_key()
    headers = {**auth(key), "x-mock-interval-ms": "1000", "x-mock-tokens": "3"}
    started = time.monotonic()
    async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=headers) as resp:
        events = [e async for _, e in _events(resp)]
    assert time.monotonic() - started < 2.5
    error = orjson.loads(events[-1][6:])
    assert error["error"]["code"] == "upstream_timeout"
    assert b"[DONE]" not in b"".join(events)


async def test_long_streams_are_not_cut_by_the_total_timeout(make_gateway, http):
    gateway = await make_gateway(timeouts=Timeouts(connect=1, first_byte=2, idle=1, total=0.5))
    key, _ = await gateway.create_key()
    headers = {**auth(key), "x-mock-interval-ms": "100", "x-mock-tokens": "10"}
    async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=headers) as resp:
        events = [e async for _, e in _events(resp)]
    assert events[-1] == b"data: [DONE]\n\n"


async def test_a_slow_body_gets_408_and_the_connection_closed(make_gateway, http):
    gateway = await make_gateway(request_body_timeout=0.5)
    key, _ = await gateway.create_key()

    async def trickle():
        yield b'{"model": "crimson-falcon-4", '
        await asyncio.sleep(3)
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    started = time.monotonic()
    async with http.post(gateway.url + CHAT, data=trickle(),
                         headers={**auth(key), "Content-Type": "application/json"}) as resp:  # fmt: skip
        assert resp.status == 408
        body = await resp.json()
    assert time.monotonic() - started < 2.5
    assert body["error"]["code"] == "request_timeout"


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def test_events_that_arrived_before_the_upstream_broke_are_still_relayed(make_gateway, redis_url, http):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        writer.write(SSE_HEAD + _chunk(b'data: {"n": 1}\n\ndata: {"n"') + _chunk(b': 2}\n\ndata: {"n": 3}\n\ndata: {"n'))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()  # cut mid-event, mid-chunk

    async with RawServer(answer) as server:
        gateway = await make_gateway(settings=gateway_settings(server.url, redis_url))
        key, _ = await gateway.create_key()
        async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=auth(key)) as resp:
            events = [e async for _, e in _events(resp)]
    assert events[:3] == [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b'data: {"n": 3}\n\n']
    assert orjson.loads(events[3][6:])["error"]["code"] == "upstream_unavailable"
    assert len(events) == 4  # the half event is not passed on


async def test_a_slow_client_pauses_the_upstream_instead_of_filling_the_gateway(make_gateway, redis_url):
    """While the client reads nothing, the gateway stops reading the upstream: the upstream's
    writes back up (it cannot finish), and every byte still arrives once the client reads."""
    event = b"data: " + b"x" * 16_000 + b"\n\n"
    count = 4000  # 64 MB: far more than the sockets' buffers hold
    finished = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        writer.write(SSE_HEAD)
        for _ in range(count):
            writer.write(_chunk(event))
            await writer.drain()
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        finished.set()

    async with RawServer(answer) as server:
        gateway = await make_gateway(settings=gateway_settings(server.url, redis_url))
        key, _ = await gateway.create_key()
        body = orjson.dumps(chat_body(stream=True))
        reader, writer = await asyncio.open_connection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))  # fmt: skip
        await asyncio.sleep(1.5)  # the client reads nothing meanwhile
        assert not finished.is_set()
        received, data = 0, b""
        async with asyncio.timeout(30):
            await reader.readuntil(b"\r\n\r\n")
            while not finished.is_set() or not data.endswith(b"0\r\n\r\n"):
                data = await reader.read(2**20)
                assert data
                received += data.count(b"x")
        writer.close()
    assert received == count * 16_000


async def test_an_http_1_0_client_gets_the_stream_unchunked(gateway, key):
    body = orjson.dumps(chat_body(stream=True))
    reader, writer = await asyncio.open_connection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))
    writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))  # fmt: skip
    async with asyncio.timeout(10):
        answer = await reader.read()  # the gateway closes the connection at the end
    writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    events = rest.split(b"\n\n")
    assert events[0].startswith(b"data: {") and events[-2] == b"data: [DONE]" and events[-1] == b""


async def test_requests_leave_no_gateway_objects_in_reference_cycles(gateway, key, http):
    """Cycles would make the collector's full passes (and their pauses) frequent under load."""
    for stream in (True, False):
        async with http.post(gateway.url + CHAT, json=chat_body(stream=stream), headers=auth(key)) as resp:
            await resp.read()
    await gateway.settled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for stream in (True, False) * 5:
            async with http.post(gateway.url + CHAT, json=chat_body(stream=stream), headers=auth(key)) as resp:
                await resp.read()
        await gateway.settled()
        gc.collect()
        ours = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("gateway.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []


@pytest.mark.parametrize("stream", [True, False])
async def test_an_upstream_that_answers_garbage_is_a_502(make_gateway, redis_url, http, stream):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with RawServer(answer) as server:
        gateway = await make_gateway(settings=gateway_settings(server.url, redis_url))
        key, _ = await gateway.create_key()
        async with http.post(gateway.url + CHAT, json=chat_body(stream=stream), headers=auth(key)) as resp:
            assert resp.status == 502
            body = await resp.json()
    assert body["error"]["type"] == "upstream_error" and body["error"]["code"] == "upstream_unavailable"
