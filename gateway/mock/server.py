"""A fake Liutong model server (OpenAI-style Chat Completions) for demos, tests and benchmarks.

It answers ``POST /v1/chat/completions`` for any model id, JSON or SSE (``"stream": true``,
with ``stream_options.include_usage``), with deterministic text: completion token *k* of
choice *c* is word ``(crc32(model + "\\0" + last message content) + 23*c + k) mod 64`` of a
fixed 64-word list, the first token bare and every later one with its leading space (one word
= one token). ``completion_tokens`` is 16 unless the request header ``x-mock-tokens`` says
otherwise, capped by ``max_tokens`` / ``max_completion_tokens`` (finish reason ``length``) and
cut before the first ``stop`` string found (finish reason ``stop``, a cut inside a word emits
that word's prefix as one token); with ``n`` choices it is the sum over the choices.
``prompt_tokens`` is an estimate: 2 + the sum over messages of 4 + ceil(len(content) / 4),
content that is not a string counting as "". Request headers choose failures and timing:
``x-mock-status: S`` (400-599) answers S with an OpenAI-style error body and generates
nothing; ``x-mock-delay-ms: N`` waits N ms before the response headers; for streams
``x-mock-first-event-delay-ms: N`` sends the headers at once and waits N ms before the first
event; ``x-mock-interval-ms: N`` waits N ms before each token (a non-streaming answer waits
the whole N x tokens); ``x-mock-drop-after: K`` aborts the connection after K SSE events
(every ``data:`` event counts, ``[DONE]`` too; a stream of K or fewer events completes) or, for
a non-streaming request, closes it without an answer; ``x-mock-no-usage: 1`` never sends
usage; ``x-mock-tokens: N`` sets the token count. A bad value in any of these is a 400 whose
``param`` names the header. Every chat request is recorded under its ``x-request-id`` (or
the mock's own id): model, stream flag, whether ``Authorization`` arrived (never its value),
the other headers, the parsed body, prompt tokens, completion tokens actually written, and an
outcome ``completed``, ``cancelled`` (the client went away; ``cancelled_at`` is the
``time.monotonic()`` of that moment), ``dropped`` or ``error_status``. ``GET /mock/stats``
returns the counters and records (``?request_id=X`` keeps only X's), ``POST /mock/reset``
clears them, ``GET /health`` and ``GET /v1/models`` answer too. State lives on the app.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import time
from collections.abc import Iterable
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.mock.requests import BadMockRequest, Controls, Plan, error_body, forced_error, parse_body
from gateway.mock.text import Token, apply_stop, estimate_prompt_tokens, generate_tokens

__all__ = [
    "MockRecord",
    "MockState",
    "MockStats",
    "STATE_KEY",
    "create_mock_app",
    "run_mock_upstream",
    "start_mock_upstream",
]

MODELS: Final = ("crimson-falcon-4", "indigo-owl-4", "amber-phoenix-4")
MAX_RECORDS: Final = 10_000
CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024

# With no interval, a stream yields to the loop every this many token positions (a write only
# suspends when the socket buffer is full, so a long stream would otherwise hog the loop).
_YIELD_EVERY: Final = 32
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})
_DONE: Final = b"data: [DONE]\n\n"

@dataclasses.dataclass(slots=True)
class MockRecord:
    """What the mock saw of one chat request and what it sent back."""

    request_id: str
    completion_id: str
    started_at: float
    authorization: bool
    headers: dict[str, str]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    body: Any = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    events_written: int = 0
    outcome: str = "active"
    status: int | None = None
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    finished_at: float | None = None
    cancelled_at: float | None = None


@dataclasses.dataclass(slots=True)
class MockStats:
    """Counters since the last reset, and the latest records in arrival order."""

    max_records: int = MAX_RECORDS
    requests: int = 0
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    dropped: int = 0
    error_status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    records: collections.deque[MockRecord] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.records = collections.deque(maxlen=self.max_records)

    def open(self, record: MockRecord) -> None:
        self.requests += 1
        self.active += 1
        self.records.append(record)

    def finish(self, record: MockRecord, outcome: str, status: int | None = None) -> None:
        """Close a record once; later calls (e.g. a cancel after a drop) change nothing."""
        if record.outcome != "active":
            return
        now = time.monotonic()
        record.outcome, record.finished_at = outcome, now
        if status is not None:
            record.status = status
        if outcome == "cancelled":
            record.cancelled_at = now
        self.active -= 1
        setattr(self, outcome, getattr(self, outcome) + 1)

    def as_json(self, request_id: str | None = None) -> dict[str, Any]:
        records = [r for r in self.records if request_id is None or r.request_id == request_id]
        return {
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "dropped": self.dropped,
            "error_status": self.error_status,
            "active": self.active,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "records": records,
        }


@dataclasses.dataclass(slots=True)
class MockState:
    """The app's state; a reset swaps in new stats so that in-flight requests touch the old."""

    stats: MockStats


STATE_KEY: Final = web.AppKey("liutong_mock_state", MockState)


def _json_response(status: int, body: bytes, request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers={"x-request-id": request_id},
    )


def _choices(plan: Plan, count: int) -> list[tuple[list[Token], str]]:
    """Each choice's tokens and finish reason."""
    capped = plan.cap is not None and plan.cap < count
    count = min(count, plan.cap) if plan.cap is not None else count
    out = []
    for c in range(plan.n):
        tokens = generate_tokens(plan.model, plan.prompt, count, c)
        cut = apply_stop(tokens, plan.stops) if plan.stops else None
        if cut is not None:
            out.append((cut, "stop"))
        else:
            out.append((tokens, "length" if capped else "stop"))
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATE_KEY].stats
    headers = request.headers
    completion_id = "chatcmpl-" + os.urandom(12).hex()
    request_id = headers.get("x-request-id") or completion_id
    record = MockRecord(
        request_id=request_id,
        completion_id=completion_id,
        started_at=time.monotonic(),
        authorization="authorization" in headers,
        headers={k.lower(): v for k, v in headers.items() if k.lower() not in _SECRET_HEADERS},
    )
    stats.open(record)
    try:
        try:
            controls = Controls.parse(headers)
            body, plan = parse_body(await request.read())
        except BadMockRequest as exc:
            stats.finish(record, "error_status", 400)
            error = error_body(exc.message, "invalid_request_error", exc.param, None)
            return _json_response(400, error, request_id)
        record.model, record.body, record.n = plan.model, body, plan.n
        record.stream, record.include_usage = plan.stream, plan.include_usage
        record.prompt_tokens = estimate_prompt_tokens(body["messages"])
        stats.prompt_tokens += record.prompt_tokens
        if controls.delay_ms:
            await asyncio.sleep(controls.delay_ms / 1000)
        if controls.status is not None:
            stats.finish(record, "error_status", controls.status)
            return _json_response(controls.status, forced_error(controls.status), request_id)
        choices = _choices(plan, controls.tokens)
        record.finish_reasons = [reason for _, reason in choices]
        if plan.stream:
            return await _stream(request, record, stats, controls, plan, choices)
        return await _complete(request, record, stats, controls, plan, choices)
    except asyncio.CancelledError:
        stats.finish(record, "cancelled")
        raise
    except ConnectionResetError:
        # A write found the transport closed before the handler was cancelled.
        stats.finish(record, "cancelled")
        raise asyncio.CancelledError from None


async def _complete(
    request: web.Request,
    record: MockRecord,
    stats: MockStats,
    controls: Controls,
    plan: Plan,
    choices: list[tuple[list[Token], str]],
) -> web.StreamResponse:
    longest = max((len(tokens) for tokens, _ in choices), default=0)
    if controls.interval_ms and longest:
        await asyncio.sleep(controls.interval_ms * longest / 1000)
    if controls.drop_after is not None:
        stats.finish(record, "dropped")
        _abort(request)
        return web.Response(status=500)  # never sent: the transport is gone
    completion_tokens = sum(len(tokens) for tokens, _ in choices)
    payload: dict[str, Any] = {
        "id": record.completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(t for t, _ in tokens)},
                "finish_reason": reason,
            }
            for i, (tokens, reason) in enumerate(choices)
        ],
    }
    if not controls.no_usage:
        payload["usage"] = _usage(record.prompt_tokens, completion_tokens)
    record.completion_tokens = completion_tokens
    stats.completion_tokens += completion_tokens
    stats.finish(record, "completed", 200)
    return _json_response(200, orjson.dumps(payload), record.request_id)


async def _stream(
    request: web.Request,
    record: MockRecord,
    stats: MockStats,
    controls: Controls,
    plan: Plan,
    choices: list[tuple[list[Token], str]],
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-request-id": record.request_id,
        }
    )
    await resp.prepare(request)  # sends the headers now
    record.status = 200
    include_usage = plan.include_usage and not controls.no_usage
    base: dict[str, Any] = {"id": record.completion_id, "object": "chat.completion.chunk"}
    base |= {"created": int(time.time()), "model": plan.model}
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
    # A token event is head + index + mid + JSON text + end + tail, with no dict or dumps.
    head = b"data: " + orjson.dumps(base)[:-1] + b',"choices":[{"index":'
    mid, end = b',"delta":{"content":', b'},"finish_reason":null}]'
    budget = controls.drop_after
    interval = controls.interval_ms / 1000

    def event(choices_json: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {**base, "choices": choices_json, **extra}
        if include_usage and "usage" not in extra:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def send(data: bytes, tokens: int = 0) -> bool:
        """Write one event; False once the drop budget is spent (connection aborted)."""
        nonlocal budget
        if budget is not None:
            if budget == 0:
                stats.finish(record, "dropped")
                _abort(request)
                return False
            budget -= 1
        await resp.write(data)
        record.events_written += 1
        record.completion_tokens += tokens
        stats.completion_tokens += tokens
        return True

    if controls.first_event_delay_ms:
        await asyncio.sleep(controls.first_event_delay_ms / 1000)
    role = {"role": "assistant", "content": ""}
    for i in range(len(choices)):
        if not await send(event([{"index": i, "delta": role, "finish_reason": None}])):
            return resp
    indexes = [str(i).encode() for i in range(len(choices))]
    longest = max((len(tokens) for tokens, _ in choices), default=0)
    for k in range(longest):
        if interval:
            await asyncio.sleep(interval)
        elif k % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)  # let other streams, and news of a gone client, in
        for i, (tokens, _) in enumerate(choices):
            if k < len(tokens) and not await send(
                head + indexes[i] + mid + tokens[k][1] + end + tail, 1
            ):
                return resp
    for i, (_, reason) in enumerate(choices):
        if not await send(event([{"index": i, "delta": {}, "finish_reason": reason}])):
            return resp
    if include_usage:
        usage = _usage(record.prompt_tokens, record.completion_tokens)
        if not await send(event([], usage=usage)):
            return resp
    if not await send(_DONE):
        return resp
    await resp.write_eof()
    stats.finish(record, "completed")
    return resp


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _stats(request: web.Request) -> web.Response:
    stats = request.app[STATE_KEY].stats
    body = orjson.dumps(stats.as_json(request.query.get("request_id")))
    return web.Response(body=body, content_type="application/json")


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.stats = MockStats(max_records=state.stats.max_records)
    return web.Response(body=b'{"reset":true}', content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def _models(request: web.Request) -> web.Response:
    data = [
        {"id": m, "object": "model", "created": 1700000000, "owned_by": "liutong"} for m in MODELS
    ]
    body = orjson.dumps({"object": "list", "data": data})
    return web.Response(body=body, content_type="application/json")


def create_mock_app(*, max_records: int = MAX_RECORDS) -> web.Application:
    """The mock's aiohttp app; it keeps the newest ``max_records`` records (counters are exact)."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[STATE_KEY] = MockState(stats=MockStats(max_records=max_records))
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/mock/stats", _stats)
    app.router.add_post("/mock/reset", _reset)
    return app


async def start_mock_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve the mock on a socket (port 0 = a free one); the caller awaits ``runner.cleanup()``."""
    runner = web.AppRunner(
        create_mock_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.25
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


async def _serve(host: str, port: int) -> None:
    runner, bound = await start_mock_upstream(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(f"Liutong mock upstream listening on http://{shown}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_mock_upstream(host: str, port: int) -> None:
    """Run the mock until SIGINT or SIGTERM (the ``liutong-gateway mock-upstream`` command)."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port))
