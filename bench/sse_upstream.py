"""The benchmark's streaming upstream: the mock upstream's SSE answers for less CPU per event.

`liutong-gateway mock-upstream` (aiohttp, a task and an `asyncio.sleep` per stream) costs
~60 µs of CPU per event; at 500 streams × an event every 50 ms it and the load client needed
more than core 1, which they share, so even the direct TTFT p99 was hundreds of ms of queueing
and the proxies' TTFT overhead drowned in it. This server sends the same bytes for the
benchmark's requests from a bare asyncio protocol on uvloop: requests parsed by httptools, each
stream's next event a `loop.call_at` timer written with `transport.write`, one chunk per event
(~40 µs per event, half of it the kernel's loopback TCP send).

`POST /v1/chat/completions` with `"stream": true` answers as the mock does: the role event at
once, then `x-mock-tokens` (default 16, capped by `max_completion_tokens` / `max_tokens`) token
events `x-mock-interval-ms` apart (default 0: as fast as the socket takes them), the finish
event, the usage chunk when `stream_options.include_usage` is true (and no `x-mock-no-usage`),
and `data: [DONE]`; the tokens are `gateway.mock.text.generate_tokens` of the model and the
last message's content. A non-streaming request gets the same text as one chat.completion at
once. `GET /health` answers 200. Only what the benchmark needs: `n` > 1, `stop` and the mock's
other `x-mock-*` headers are a 400 (use the mock for those), there are no `/mock/stats`.

    python -m bench.sse_upstream --host 127.0.0.1 --port 9002
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http
import os
import signal
import socket
import time
from typing import Any

import httptools
import orjson
import uvloop

from gateway.mock.requests import DEFAULT_TOKENS, MAX_TOKENS_HEADER
from gateway.mock.text import estimate_prompt_tokens, generate_tokens

MAX_BODY = 64 * 1024 * 1024
_BATCH = 32  # token events per write burst when there is no interval
_HANDLED = frozenset({"x-mock-tokens", "x-mock-interval-ms", "x-mock-no-usage"})
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nx-request-id: %s\r\n\r\n"
)
# [DONE] as one chunk, then the last (empty) chunk.
_DONE_AND_LAST = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
_BAD = b'{"error":{"message":"bad request","type":"invalid_request_error"}}'

Token = tuple[str, bytes]


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """What to send for one valid chat request."""

    model: str
    stream: bool
    usage: bool  # in a JSON answer
    include_usage: bool  # in a stream
    tokens: list[Token]
    finish: str
    prompt_tokens: int
    interval: float


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(status: int, body: bytes, headers: bytes = b"") -> bytes:
    """A JSON answer; `headers` are extra header lines, each ending in CRLF."""
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    reason = http.HTTPStatus(status).phrase.encode()
    return head % (status, reason, len(body)) + headers + b"\r\n" + body


def _error(status: int, message: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": param}
    error["code"] = None
    return _response(status, orjson.dumps({"error": error}))


def _int_header(headers: dict[str, str], name: str, default: int, high: int) -> int:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= high:
        message = f"header {name} must be an integer between 0 and {high}, got {raw!r}"
        raise _BadRequest(message, name)
    return value


def _positive(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(f"'{name}' must be a positive integer", name)
    return value


def _plan(headers: dict[str, str], raw: bytes) -> _Plan:
    """What to send; a 400 for what the mock refuses or this server lacks."""
    for name in headers:
        if name.startswith("x-mock-") and name not in _HANDLED:
            raise _BadRequest(f"{name} is not supported here: use the mock", name)
    count = _int_header(headers, "x-mock-tokens", DEFAULT_TOKENS, MAX_TOKENS_HEADER)
    interval = _int_header(headers, "x-mock-interval-ms", 0, 3_600_000) / 1000
    no_usage = headers.get("x-mock-no-usage", "0").strip().lower()
    if no_usage not in ("0", "1", "true", "false"):
        raise _BadRequest("x-mock-no-usage must be 0 or 1", "x-mock-no-usage")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str):
        raise _BadRequest("'model' is required and must be a string", "model")
    if not isinstance(messages, list):
        raise _BadRequest("'messages' is required and must be an array", "messages")
    if body.get("stream") not in (None, True, False):
        raise _BadRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _BadRequest("'stream_options' must be an object", "stream_options")
    if _positive(body, "n") not in (None, 1) or body.get("stop"):
        raise _BadRequest("n > 1 and stop are not supported here: use the mock")
    cap = _positive(body, "max_completion_tokens") or _positive(body, "max_tokens")
    last = messages[-1] if messages else None
    prompt = last.get("content") if isinstance(last, dict) else None
    usage = no_usage in ("0", "false")
    return _Plan(
        model=model,
        stream=body.get("stream") is True,
        usage=usage,
        include_usage=usage and bool(options and options.get("include_usage") is True),
        tokens=generate_tokens(
            model, prompt if isinstance(prompt, str) else "", min(count, cap or count)
        ),
        finish="length" if cap is not None and cap < count else "stop",
        prompt_tokens=estimate_prompt_tokens(messages),
        interval=interval,
    )


class _Connection(asyncio.Protocol):
    """One client connection, one request at a time; a stream is a chain of timers."""

    def __init__(self, connections: set[_Connection]) -> None:
        self.loop = asyncio.get_running_loop()
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.streaming = False
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.paused = self.stalled = False
        # The stream in progress: token k is sent next, as head + its JSON + tail.
        self.tokens: list[Token] = []
        self.k = 0
        self.head = self.tail = self.ending = b""
        self.interval = 0.0

    # --- the connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.stop()

    def stop(self) -> None:
        """End the stream in progress, if any: its next event is never sent."""
        self.streaming = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.stalled:
            self.stalled = False
            self._tick()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
            bad = self.size > MAX_BODY
        except httptools.HttpParserError:
            bad = True
        if bad or self.streaming:  # (bytes during a stream: pipelining, unsupported)
            if not self.streaming:  # (an answer would corrupt the stream)
                self.transport.write(_response(400, _BAD, b"Connection: close\r\n"))
            self.stop()
            self.transport.close()
        elif self.complete:
            self.complete = False
            self._route()

    # --- httptools callbacks: they only collect (an error in them is a parser error)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.size = b"", {}, [], 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= MAX_BODY:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # --- the answers ----------------------------------------------------------------

    def _route(self) -> None:
        method, path = self.parser.get_method(), self.url.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and method == b"POST":
            self._chat()
        elif path == b"/health" and method == b"GET":
            self._answer(_response(200, b'{"status":"ok"}'))
        else:
            status = 404 if method in (b"GET", b"POST") else 405
            self._answer(_error(status, "no such route"))

    def _answer(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if not self.parser.should_keep_alive():
            self.transport.close()

    def _chat(self) -> None:
        try:
            plan = _plan(self.headers, b"".join(self.body))
        except _BadRequest as exc:
            self._answer(_error(400, exc.message, exc.param))
            return
        completion_id = "chatcmpl-" + os.urandom(12).hex()
        request_id = self.headers.get("x-request-id") or completion_id
        base: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk"}
        base |= {"created": int(time.time()), "model": plan.model}
        prompt, completion = plan.prompt_tokens, len(plan.tokens)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        usage["total_tokens"] = prompt + completion
        if plan.stream:
            self._stream(plan, base, usage, request_id.encode("latin-1"))
            return
        text = "".join(t for t, _ in plan.tokens)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": plan.finish}
        answer = base | {"object": "chat.completion", "choices": [choice]}
        if plan.usage:
            answer["usage"] = usage
        header = f"x-request-id: {request_id}\r\n".encode("latin-1")
        self._answer(_response(200, orjson.dumps(answer), header))

    def _stream(
        self,
        plan: _Plan,
        base: dict[str, Any],
        usage: dict[str, int],
        request_id: bytes,
    ) -> None:
        def event(choices: list[Any], usage: Any = None) -> bytes:
            chunk = base | {"choices": choices}
            if plan.include_usage:
                chunk["usage"] = usage
            return _chunk(b"data: " + orjson.dumps(chunk) + b"\n\n")

        role = {"role": "assistant", "content": ""}
        first = event([{"index": 0, "delta": role, "finish_reason": None}])
        finish = event([{"index": 0, "delta": {}, "finish_reason": plan.finish}])
        last = event([], usage) if plan.include_usage else b""
        self.ending = finish + last + _DONE_AND_LAST
        # The very bytes of the mock's token events, with no dict or dumps per event.
        self.head = b"data: " + orjson.dumps(base)[:-1]
        self.head += b',"choices":[{"index":0,"delta":{"content":'
        self.tail = b'},"finish_reason":null}]'
        self.tail += b',"usage":null}\n\n' if plan.include_usage else b"}\n\n"
        self.tokens, self.k, self.interval = plan.tokens, 0, plan.interval
        self.streaming = True
        assert self.transport is not None
        self.transport.write(_STREAM_HEAD % request_id + first)
        if self.tokens:
            self._next()
        else:
            self._finish()

    def _next(self) -> None:
        if self.interval:
            when = self.loop.time() + self.interval
            self.timer = self.loop.call_at(when, self._tick)
        else:
            self.timer = self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.timer = None
        if not self.streaming:
            return
        if self.paused:  # the reader is behind: resume_writing carries on
            self.stalled = True
            return
        assert self.transport is not None
        write, head, tail = self.transport.write, self.head, self.tail
        stop = min(len(self.tokens), self.k + (1 if self.interval else _BATCH))
        for _, text in self.tokens[self.k : stop]:
            data = head + text + tail
            write(b"%x\r\n%s\r\n" % (len(data), data))
        self.k = stop
        if stop < len(self.tokens):
            self._next()
        else:
            self._finish()

    def _finish(self) -> None:
        assert self.transport is not None
        self.transport.write(self.ending)
        self.streaming = False
        self.tokens = []
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    connections: set[_Connection] = set()
    server = await loop.create_server(
        lambda: _Connection(connections), host, port, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"bench SSE upstream listening on http://{host}:{bound}", flush=True)
    await stop.wait()
    server.close()
    for conn in list(connections):
        conn.stop()
        if conn.transport is not None:
            conn.transport.abort()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
