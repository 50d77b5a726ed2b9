"""The mock upstream on a real socket: bodies, token sums, SSE bytes, failure headers, stats."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.mock.server import start_mock_upstream

pytestmark = pytest.mark.asyncio

SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},  # 28 chars -> 4 + 7
    {"role": "user", "content": "Explain quantum entanglement in simple terms."},  # 45 -> 4 + 12
]
SEED_PROMPT_TOKENS = 2 + 11 + 16
HELLO = [{"role": "user", "content": "Hello!"}]  # 2 + 4 + 2 = 8 prompt tokens


@pytest.fixture
async def base() -> AsyncIterator[str]:
    runner, port = await start_mock_upstream()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def chat(
    session: aiohttp.ClientSession, base: str, body: Any, **headers: str
) -> tuple[int, Any]:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(f"{base}/v1/chat/completions", data=data, headers=hdrs) as resp:
        return resp.status, orjson.loads(await resp.read())


async def stats(session: aiohttp.ClientSession, base: str) -> Any:
    async with session.get(f"{base}/mock/stats") as resp:
        assert resp.status == 200
        return await resp.json()


def parse_sse(raw: bytes) -> list[Any]:
    """Every event must be exactly `data: <payload>\\n\\n`; [DONE] is returned as the string."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    out: list[Any] = []
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event, event
        payload = event[len(b"data: ") :]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


async def test_non_streaming_shape_and_usage(session: aiohttp.ClientSession, base: str) -> None:
    body = {"model": "crimson-falcon-4", "messages": SEED_MESSAGES, "max_tokens": 512}
    status, data = await chat(session, base, body)
    assert status == 200
    assert set(data) == {"id", "object", "created", "model", "choices", "usage"}
    assert data["id"].startswith("chatcmpl-") and len(data["id"]) > len("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert data["model"] == "crimson-falcon-4"
    assert abs(data["created"] - time.time()) < 5
    [choice] = data["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split(" ")) == 16
    assert data["usage"] == {
        "prompt_tokens": SEED_PROMPT_TOKENS,
        "completion_tokens": 16,
        "total_tokens": SEED_PROMPT_TOKENS + 16,
    }
    _, again = await chat(session, base, body)
    assert again["id"] != data["id"]


async def test_text_is_deterministic_and_pinned(session: aiohttp.ClientSession, base: str) -> None:
    body = {"model": "crimson-falcon-4", "messages": HELLO}
    _, data = await chat(session, base, body, x_mock_tokens="5")
    assert data["choices"][0]["message"]["content"] == "saffron echo garnet summit pebble"
    assert data["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    _, other = await chat(session, base, {**body, "model": "indigo-owl-4"}, x_mock_tokens="5")
    assert other["choices"][0]["message"]["content"] != "saffron echo garnet summit pebble"
    _, none = await chat(session, base, body, x_mock_tokens="0")
    assert none["choices"][0]["message"]["content"] == ""
    assert none["usage"]["completion_tokens"] == 0


async def test_max_tokens_caps_with_finish_reason_length(
    session: aiohttp.ClientSession, base: str
) -> None:
    body = {"model": "amber-phoenix-4", "messages": HELLO, "max_tokens": 4}
    _, data = await chat(session, base, body)
    assert data["choices"][0]["finish_reason"] == "length"
    assert len(data["choices"][0]["message"]["content"].split(" ")) == 4
    assert data["usage"]["completion_tokens"] == 4
    _, roomy = await chat(session, base, {**body, "max_tokens": 16})
    assert roomy["choices"][0]["finish_reason"] == "stop"
    assert roomy["usage"]["completion_tokens"] == 16


async def test_stop_truncates_before_the_stop_string(
    session: aiohttp.ClientSession, base: str
) -> None:
    body = {"model": "crimson-falcon-4", "messages": HELLO}
    _, full = await chat(session, base, body)
    words = full["choices"][0]["message"]["content"].split(" ")
    # A whole word: the text stops before its leading space, 3 tokens were emitted.
    _, data = await chat(session, base, {**body, "stop": [" " + words[3], "never-there"]})
    assert data["choices"][0]["message"]["content"] == " ".join(words[:3])
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 3
    # Inside a word: its prefix is emitted as a 6th token.
    _, part = await chat(session, base, {**body, "stop": words[5][2:]})
    assert part["choices"][0]["message"]["content"] == " ".join(words[:5]) + " " + words[5][:2]
    assert part["usage"]["completion_tokens"] == 6
    # Not found, but capped: still "length".
    _, capped = await chat(session, base, {**body, "stop": "zzz", "max_tokens": 2})
    assert capped["choices"][0]["finish_reason"] == "length"


async def test_n_choices(session: aiohttp.ClientSession, base: str) -> None:
    body = {"model": "indigo-owl-4", "messages": HELLO, "n": 2}
    _, data = await chat(session, base, body, x_mock_tokens="7")
    assert [c["index"] for c in data["choices"]] == [0, 1]
    contents = [c["message"]["content"] for c in data["choices"]]
    assert [len(c.split(" ")) for c in contents] == [7, 7]
    assert contents[0] != contents[1]
    assert data["usage"] == {"prompt_tokens": 8, "completion_tokens": 14, "total_tokens": 22}


async def test_stream_with_include_usage(session: aiohttp.ClientSession, base: str) -> None:
    body = {"model": "crimson-falcon-4", "messages": HELLO}
    _, plain = await chat(session, base, body, x_mock_tokens="4")
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    url = f"{base}/v1/chat/completions"
    async with session.post(url, json=stream_body, headers={"x-mock-tokens": "4"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        raw = await resp.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = parse_sse(raw)
    assert len(events) == 1 + 4 + 1 + 1 + 1
    chunks, done = events[:-1], events[-1]
    assert done == "[DONE]"
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "crimson-falcon-4"
        assert chunk["id"] == chunks[0]["id"] and chunk["id"].startswith("chatcmpl-")
        assert chunk["created"] == chunks[0]["created"]
    role, tokens, final, usage = chunks[0], chunks[1:5], chunks[5], chunks[6]
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert "".join(t["choices"][0]["delta"]["content"] for t in tokens) == (
        plain["choices"][0]["message"]["content"]
    )
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
    assert all(set(t["choices"][0]) == {"index", "delta", "finish_reason"} for t in tokens)
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}


async def test_stream_without_usage(session: aiohttp.ClientSession, base: str) -> None:
    url = f"{base}/v1/chat/completions"
    body = {"model": "crimson-falcon-4", "messages": HELLO, "stream": True, "max_tokens": 3}
    async with session.post(url, json=body) as resp:
        events = parse_sse(await resp.read())
    assert len(events) == 1 + 3 + 1 + 1
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    # x-mock-no-usage wins over include_usage, in streams and JSON alike.
    body |= {"stream_options": {"include_usage": True}}
    async with session.post(url, json=body, headers={"x-mock-no-usage": "1"}) as resp:
        events = parse_sse(await resp.read())
    assert len(events) == 6 and all("usage" not in e for e in events[:-1])
    _, data = await chat(session, base, {**body, "stream": False}, x_mock_no_usage="1")
    assert "usage" not in data


async def test_stream_n_interleaves_choices(session: aiohttp.ClientSession, base: str) -> None:
    url = f"{base}/v1/chat/completions"
    body = {"model": "indigo-owl-4", "messages": HELLO, "stream": True, "n": 2}
    body["stream_options"] = {"include_usage": True}
    async with session.post(url, json=body, headers={"x-mock-tokens": "2"}) as resp:
        events = parse_sse(await resp.read())
    indexes = [e["choices"][0]["index"] for e in events[:-2]]
    assert indexes == [0, 1, 0, 1, 0, 1, 0, 1]
    assert events[-2]["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}


async def test_interval_spaces_events(session: aiohttp.ClientSession, base: str) -> None:
    url = f"{base}/v1/chat/completions"
    body = {"model": "crimson-falcon-4", "messages": HELLO, "stream": True}
    headers = {"x-mock-tokens": "5", "x-mock-interval-ms": "100"}
    start = time.monotonic()
    arrivals: list[float] = []
    async with session.post(url, json=body, headers=headers) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 1 + 5 + 1 + 1
    assert arrivals[0] < 0.08  # the role event leaves at once
    assert arrivals[1] >= 0.09  # the first token one interval later
    assert arrivals[-1] - arrivals[0] >= 0.45


async def test_delay_and_first_event_delay(session: aiohttp.ClientSession, base: str) -> None:
    url = f"{base}/v1/chat/completions"
    body = {"model": "crimson-falcon-4", "messages": HELLO, "stream": True}
    start = time.monotonic()
    async with session.post(url, json=body, headers={"x-mock-first-event-delay-ms": "300"}) as r:
        headers_at = time.monotonic() - start
        first = await r.content.readline()
        first_at = time.monotonic() - start
        await r.read()
    assert headers_at < 0.2 and first_at >= 0.29
    assert first.startswith(b"data: {")
    start = time.monotonic()
    async with session.post(url, json=body, headers={"x-mock-delay-ms": "300"}) as r:
        assert time.monotonic() - start >= 0.29
        await r.read()


async def test_forced_status(session: aiohttp.ClientSession, base: str) -> None:
    body = {"model": "crimson-falcon-4", "messages": HELLO, "stream": True}
    status, data = await chat(session, base, body, x_mock_status="503")
    assert status == 503
    assert data == {
        "error": {
            "message": "mock upstream: forced status 503",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    status, data = await chat(session, base, body, x_mock_status="429")
    assert status == 429 and data["error"]["code"] == "rate_limit_exceeded"
    s = await stats(session, base)
    counts = (s["requests"], s["error_status"], s["completed"], s["completion_tokens"])
    assert counts == (2, 2, 0, 0)
    assert [r["status"] for r in s["records"]] == [503, 429]
    assert [r["outcome"] for r in s["records"]] == ["error_status", "error_status"]


async def test_drop_after_breaks_the_stream(session: aiohttp.ClientSession, base: str) -> None:
    url = f"{base}/v1/chat/completions"
    body = {"model": "crimson-falcon-4", "messages": HELLO, "stream": True}
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(url, json=body, headers={"x-mock-drop-after": "3"}) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    received.append(line)
    assert len(received) == 3  # role + 2 tokens, no [DONE]
    s = await stats(session, base)
    assert (s["dropped"], s["completed"], s["active"], s["completion_tokens"]) == (1, 0, 0, 2)
    [record] = s["records"]
    assert (record["outcome"], record["completion_tokens"], record["events_written"]) == (
        "dropped",
        2,
        3,
    )


async def test_drop_non_streaming_closes_without_answer(
    session: aiohttp.ClientSession, base: str
) -> None:
    body = {"model": "crimson-falcon-4", "messages": HELLO}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await chat(session, base, body, x_mock_drop_after="0")
    s = await stats(session, base)
    assert (s["dropped"], s["completion_tokens"], s["prompt_tokens"]) == (1, 0, 8)


async def test_client_disconnect_is_recorded_as_cancelled(
    session: aiohttp.ClientSession, base: str
) -> None:
    url = f"{base}/v1/chat/completions"
    body = {"model": "crimson-falcon-4", "messages": HELLO, "stream": True}
    headers = {"x-mock-tokens": "100", "x-mock-interval-ms": "50", "x-request-id": "gone-1"}
    async with aiohttp.ClientSession() as client:
        resp = await client.post(url, json=body, headers=headers)
        lines = 0
        async for line in resp.content:
            lines += line.startswith(b"data: ")
            if lines == 3:  # role + 2 tokens
                break
        resp.close()
        closed_at = time.monotonic()
    record: dict[str, Any] = {}
    while time.monotonic() - closed_at < 1.0:
        async with session.get(f"{base}/mock/stats", params={"request_id": "gone-1"}) as r:
            s = await r.json()
        record = s["records"][0]
        if record["outcome"] != "active":
            break
        await asyncio.sleep(0.02)
    assert record["outcome"] == "cancelled"
    assert 0 <= record["cancelled_at"] - closed_at < 1.0
    assert 2 <= record["completion_tokens"] <= 4
    assert (s["cancelled"], s["active"], s["completed"]) == (1, 0, 0)
    assert s["completion_tokens"] == record["completion_tokens"]


async def test_stats_records_and_reset(session: aiohttp.ClientSession, base: str) -> None:
    body = {"model": "crimson-falcon-4", "messages": SEED_MESSAGES}
    secret = "Bearer lt_ThisMustNeverShowUpInTheStats0000000000"
    await chat(session, base, body, x_request_id="req-a", authorization=secret)
    await chat(session, base, {**body, "n": 2}, x_request_id="req-b", x_mock_tokens="3")
    async with session.get(f"{base}/mock/stats") as resp:
        raw = await resp.read()
    assert b"lt_ThisMustNever" not in raw
    s = orjson.loads(raw)
    assert {k: v for k, v in s.items() if k != "records"} == {
        "requests": 2,
        "completed": 2,
        "cancelled": 0,
        "dropped": 0,
        "error_status": 0,
        "active": 0,
        "prompt_tokens": 2 * SEED_PROMPT_TOKENS,
        "completion_tokens": 16 + 6,
    }
    a, b = s["records"]
    assert (a["request_id"], b["request_id"]) == ("req-a", "req-b")
    assert (a["authorization"], b["authorization"]) == (True, False)
    assert "authorization" not in a["headers"] and b["headers"]["x-mock-tokens"] == "3"
    assert (a["model"], a["stream"], a["outcome"], a["status"]) == (
        "crimson-falcon-4",
        False,
        "completed",
        200,
    )
    assert b["body"] == {**body, "n": 2}
    assert (b["prompt_tokens"], b["completion_tokens"], b["finish_reasons"]) == (
        SEED_PROMPT_TOKENS,
        6,
        ["stop", "stop"],
    )
    async with session.post(f"{base}/mock/reset") as resp:
        assert resp.status == 200
    s = await stats(session, base)
    assert s["requests"] == 0 and s["completion_tokens"] == 0 and s["records"] == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        (b"[]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 5, "messages": []}', "model"),
        (b'{"model": "crimson-falcon-4", "messages": "hi"}', "messages"),
        (b'{"model": "crimson-falcon-4", "messages": [], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "crimson-falcon-4", "messages": [], "stop": [1]}', "stop"),
    ],
)
async def test_bad_body_is_400(
    session: aiohttp.ClientSession, base: str, body: bytes, param: str | None
) -> None:
    status, data = await chat(session, base, body)
    assert status == 400
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error"
    assert (data["error"]["param"], data["error"]["code"]) == (param, None)
    s = await stats(session, base)
    assert (s["requests"], s["error_status"], s["records"][0]["status"]) == (1, 1, 400)


async def test_bad_control_header_is_400(session: aiohttp.ClientSession, base: str) -> None:
    body = {"model": "crimson-falcon-4", "messages": HELLO}
    status, data = await chat(session, base, body, x_mock_tokens="many")
    assert status == 400 and data["error"]["param"] == "x-mock-tokens"
    status, data = await chat(session, base, body, x_mock_status="200")
    assert status == 400 and data["error"]["param"] == "x-mock-status"


async def test_prompt_estimate_treats_non_string_content_as_empty(
    session: aiohttp.ClientSession, base: str
) -> None:
    messages = [{"role": "user", "content": None}, "odd", {"role": "user", "content": "abcde"}]
    _, data = await chat(session, base, {"model": "m", "messages": messages})
    assert data["usage"]["prompt_tokens"] == 2 + 4 + 4 + (4 + 2)


async def test_health_and_models(session: aiohttp.ClientSession, base: str) -> None:
    async with session.get(f"{base}/health") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    async with session.get(f"{base}/v1/models") as resp:
        data = await resp.json()
    assert data["object"] == "list"
    ids = [m["id"] for m in data["data"]]
    assert ids == ["crimson-falcon-4", "indigo-owl-4", "amber-phoenix-4"]
    assert all(m["object"] == "model" for m in data["data"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_run_mock_upstream_serves_until_signalled(sig: signal.Signals) -> None:
    code = "from gateway.mock.server import run_mock_upstream; run_mock_upstream('127.0.0.1', 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=PIPE, stderr=PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("Liutong mock upstream listening on http://127.0.0.1:")
        async with aiohttp.ClientSession() as client:
            async with client.get(line.split()[-1] + "/health") as resp:
                assert await resp.json() == {"status": "ok"}
        proc.send_signal(sig)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err
        assert err == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
