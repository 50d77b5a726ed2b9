"""An SSE load client: many concurrent streams from the streaming upstream, each event checked.

`--streams` slots each run `--rounds` streams one after another on one keep-alive connection;
slot k starts k/streams of a stream's length after the first, so the streams overlap evenly and
the concurrency stays at `--streams` instead of arriving as one burst. Each stream asks the
upstream (`bench/sse_upstream.py` or the mock, through the proxy under test or directly) for
`--events` tokens `--interval-ms` apart, with usage included.

While the streams run the client only stores each response's bytes and notes the moment the
first content token arrives (a bare asyncio protocol on uvloop with httptools' parser; no event
is split or decoded yet), so that it leaves most of the shared core to the upstream and the
proxy. Afterwards, outside the measured window and its CPU time, it checks every event: one `data:` line of valid JSON (or `[DONE]`), and the
content of the token events exactly the mock's deterministic tokens in order. It reports
time-to-first-token (request written → first content event read) percentiles, events received,
lost (expected − valid), merged (two events run together or broken JSON), streams whose content
differs, and the client's own CPU time during the run. Prints one JSON object.

    python -m bench.sse_load --url http://127.0.0.1:8080/v1/chat/completions --key lt_... \
        --streams 100 --events 100 --interval-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

from bench.stats import percentile
from gateway.mock.text import generate_tokens

_DONE = b"data: [DONE]"
# role event, the token events, the finish event, the usage event, [DONE]
EXTRA_EVENTS = 4
# A token event's content: a non-empty string (the role event's content is "").
_CONTENT = re.compile(rb'"content":\s*"[^"]')
# Bytes of the previous body piece searched again, for a match split across two pieces.
_OVERLAP = 16
READ_TIMEOUT = 30.0  # seconds without a byte before a stream fails


@dataclass(slots=True)
class _Stream:
    prompt: str
    started: float = 0.0
    ttft: float | None = None
    duration: float = 0.0
    status: int = 0
    body: list[bytes] = field(default_factory=list)
    tail: bytes = b""
    error: str | None = None
    finished: bool = False


@dataclass(slots=True)
class _Checked:
    valid: int = 0
    malformed: int = 0
    contents: list[str] = field(default_factory=list)
    done: bool = False


class _Connection(asyncio.Protocol):
    """A keep-alive connection carrying one stream at a time: it records bytes and times."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.stream: _Stream | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.framed = False  # the answer has a length or is chunked (else: ends at EOF)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, data: bytes, stream: _Stream) -> asyncio.Future[None]:
        assert self.transport is not None and self.waiter is None
        self.stream = stream
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(type(exc).__name__)

    def on_message_begin(self) -> None:
        self.framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        if self.stream is not None:
            self.stream.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        stream.body.append(body)
        if stream.ttft is None:
            if _CONTENT.search(stream.tail + body):
                stream.ttft = time.perf_counter() - stream.started
            else:
                stream.tail = body[-_OVERLAP:]

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._end(None)

    def fail(self, error: str) -> None:
        """End the stream in progress with `error` and drop the connection."""
        self.closed = True
        self._end(error)
        if self.transport is not None:
            self.transport.abort()

    def _end(self, error: str | None) -> None:
        stream, self.stream = self.stream, None
        if stream is not None and not stream.finished:
            stream.duration = time.perf_counter() - stream.started
            stream.error, stream.finished = error, True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        stream = self.stream
        if exc is None and stream is not None and stream.status and not self.framed:
            self._end(None)  # an answer that ends when the connection does
        self.fail(type(exc).__name__ if exc else "ConnectionClosed")


def _check(stream: _Stream) -> _Checked:
    """Every event of a stream's stored bytes, checked as the events it should be."""
    out = _Checked()
    *events, rest = b"".join(stream.body).split(b"\n\n")
    for event in events:
        if event == _DONE:
            out.valid += 1
            out.done = True
            continue
        if not event.startswith(b"data: ") or event.count(b"data:") != 1:
            out.malformed += 1
            continue
        try:
            payload = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            out.malformed += 1
            continue
        out.valid += 1
        choices = payload.get("choices")
        if choices:
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                out.contents.append(content)
    if rest.strip():
        out.malformed += 1
    return out


async def _watch(connections: set[_Connection]) -> None:
    """Fail a stream that has received nothing for READ_TIMEOUT seconds."""
    seen: dict[_Connection, tuple[int, float]] = {}
    while True:
        await asyncio.sleep(1.0)
        now = time.perf_counter()
        for conn in list(connections):
            stream = conn.stream
            if stream is None:
                continue
            size, since = seen.get(conn, (-1, now))
            if len(stream.body) != size:
                seen[conn] = (len(stream.body), now)
            elif now - since > READ_TIMEOUT:
                conn.fail("read_timeout")


def _request(args: argparse.Namespace, prompt: str) -> bytes:
    parts = urlsplit(args.url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    body = orjson.dumps(
        {
            "model": args.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": args.events,
        }
    )
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"x-mock-tokens: {args.events}",
        f"x-mock-interval-ms: {args.interval_ms}",
    ]
    if args.key:
        head.append(f"Authorization: Bearer {args.key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    length = args.events * args.interval_ms / 1000
    stagger = length if args.stagger is None else args.stagger
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    streams: list[_Stream] = []
    connections: set[_Connection] = set()

    async def slot(k: int) -> None:
        await asyncio.sleep(stagger * k / args.streams)
        conn: _Connection | None = None
        for r in range(args.rounds):
            stream = _Stream(f"stream {k} round {r}")
            request = _request(args, stream.prompt)
            streams.append(stream)
            stream.started = time.perf_counter()
            if conn is None or conn.closed:
                try:
                    _, conn = await loop.create_connection(_Connection, host, port)
                except OSError as exc:
                    stream.error, stream.finished = type(exc).__name__, True
                    conn = None
                    continue
                connections.add(conn)
            await conn.request(request, stream)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    watchdog = loop.create_task(_watch(connections))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(stagger + args.rounds * length * 3 + 30):
            await asyncio.gather(*(slot(k) for k in range(args.streams)))
    except TimeoutError:
        for stream in streams:
            if not stream.finished:
                stream.error, stream.finished = "global_timeout", True
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    watchdog.cancel()
    for conn in connections:
        if conn.transport is not None:
            conn.transport.abort()
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return _summary(args, streams) | {
        "elapsed_s": round(elapsed, 3),
        "client_cpu_s": round(client_cpu, 3),
    }


def _summary(args: argparse.Namespace, streams: list[_Stream]) -> dict[str, object]:
    """Every stream checked, counted and timed (after the run, outside its CPU time)."""
    expected_each = args.events + EXTRA_EVENTS
    received = lost = merged = wrong = failed = not_done = 0
    ttfts: list[float] = []
    durations: list[float] = []
    errors: dict[str, int] = {}
    for s in streams:
        if s.status != 200 and s.error is None:
            s.error = f"status_{s.status}"
        checked = _check(s) if s.status == 200 else _Checked()
        received += checked.valid
        merged += checked.malformed
        lost += max(0, expected_each - checked.valid)
        if s.error:
            failed += 1
            errors[s.error] = errors.get(s.error, 0) + 1
            continue
        if not checked.done:
            not_done += 1
        expected = generate_tokens(args.model, s.prompt, args.events)
        if checked.contents != [text for text, _ in expected]:
            wrong += 1
        if s.ttft is not None:
            ttfts.append(s.ttft * 1000)
        durations.append(s.duration * 1000)
    return {
        "streams": len(streams),
        "failed_streams": failed,
        "errors": errors,
        "events_expected": len(streams) * expected_each,
        "events_received": received,
        "events_lost": lost,
        "events_merged": merged,
        "streams_wrong_content": wrong,
        "streams_without_done": not_done,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p90_ms": percentile(ttfts, 90),
        "ttft_p99_ms": percentile(ttfts, 99),
        "ttft_max_ms": max(ttfts) if ttfts else None,
        "stream_ms_p50": percentile(durations, 50),
        "stream_ms_p99": percentile(durations, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key")
    parser.add_argument("--model", default="bench-sse")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams")
    parser.add_argument(
        "--events", type=int, default=100, help="token events per stream"
    )
    parser.add_argument(
        "--interval-ms", type=int, default=10, help="between token events"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="streams per slot, one after another"
    )
    parser.add_argument(
        "--stagger",
        type=float,
        help="seconds over which the slots start (default: one stream's length)",
    )
    args = parser.parse_args()
    if args.streams * args.rounds > 20_000 or args.events > 10_000:
        parser.error("too many streams or events for one bounded run")
    result = uvloop.run(run(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
