"""An SSE load client: many concurrent streams from the mock upstream, each event checked.

`--streams` slots each run `--rounds` streams one after another; slot k starts k/streams of a
stream's length after the first, so the streams overlap evenly and the concurrency stays at
`--streams` instead of arriving as one burst. Each stream asks the mock (through the proxy
under test, or directly) for `--events` tokens `--interval-ms` apart, with usage included, and
is checked event by event: every event must be one `data:` line of valid JSON (or `[DONE]`),
and the content of the token events must be exactly the mock's deterministic tokens in order.
Per run it reports time-to-first-token (request written → first content event read)
percentiles, events received, lost (expected − valid), merged (two events run together or
broken JSON), streams whose content differs, and the client's own CPU time. Prints one JSON
object.

    python -m bench.sse_load --url http://127.0.0.1:8080/v1/chat/completions --key lt_... \
        --streams 100 --events 100 --interval-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
import uvloop

from bench.stats import percentile
from gateway.mock_upstream import generate_tokens

_DONE = b"data: [DONE]"
# role event, the token events, the finish event, the usage event, [DONE]
EXTRA_EVENTS = 4


@dataclass(slots=True)
class _Stream:
    ttft: float | None = None
    duration: float = 0.0
    valid: int = 0
    malformed: int = 0
    contents: list[str] = field(default_factory=list)
    done: bool = False
    error: str | None = None


async def _one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes, stream: _Stream
) -> None:
    started = time.perf_counter()
    buffer = b""
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                stream.error = f"status_{resp.status}"
                await resp.read()
                return
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                buffer += chunk
                end = buffer.rfind(b"\n\n")
                if end < 0:
                    continue
                complete, buffer = buffer[:end], buffer[end + 2 :]
                for event in complete.split(b"\n\n"):
                    if event == _DONE:
                        stream.valid += 1
                        stream.done = True
                        continue
                    if not event.startswith(b"data: ") or event.count(b"data:") != 1:
                        stream.malformed += 1
                        continue
                    try:
                        payload = orjson.loads(event[6:])
                    except orjson.JSONDecodeError:
                        stream.malformed += 1
                        continue
                    stream.valid += 1
                    choices = payload.get("choices")
                    if choices:
                        content = (choices[0].get("delta") or {}).get("content")
                        if content:
                            if stream.ttft is None:
                                stream.ttft = now - started
                            stream.contents.append(content)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        stream.error = type(exc).__name__
    if buffer.strip():
        stream.malformed += 1
    stream.duration = time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, object]:
    length = args.events * args.interval_ms / 1000
    stagger = length if args.stagger is None else args.stagger
    headers = {"Content-Type": "application/json", "x-mock-tokens": str(args.events),
               "x-mock-interval-ms": str(args.interval_ms)}  # fmt: skip
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    streams: list[tuple[str, _Stream]] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:

        async def slot(k: int) -> None:
            await asyncio.sleep(stagger * k / args.streams)
            for r in range(args.rounds):
                prompt = f"stream {k} round {r}"
                body = orjson.dumps({
                    "model": args.model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": args.events,
                })  # fmt: skip
                stream = _Stream()
                streams.append((prompt, stream))
                await _one(session, args.url, headers, body, stream)

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        limit = stagger + args.rounds * length * 3 + 30
        async with asyncio.timeout(limit):
            await asyncio.gather(*(slot(k) for k in range(args.streams)))
        elapsed = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)

    expected_each = args.events + EXTRA_EVENTS
    lost = merged = wrong = failed = not_done = 0
    received = 0
    ttfts: list[float] = []
    durations: list[float] = []
    errors: dict[str, int] = {}
    for prompt, s in streams:
        received += s.valid
        merged += s.malformed
        lost += max(0, expected_each - s.valid)
        if s.error:
            failed += 1
            errors[s.error] = errors.get(s.error, 0) + 1
            continue
        if not s.done:
            not_done += 1
        expected = [text for text, _ in generate_tokens(args.model, prompt, args.events)]
        if s.contents != expected:
            wrong += 1
        if s.ttft is not None:
            ttfts.append(s.ttft * 1000)
        durations.append(s.duration * 1000)
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
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
        "elapsed_s": round(elapsed, 3),
        "client_cpu_s": round(client_cpu, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key")
    parser.add_argument("--model", default="bench-sse")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams")
    parser.add_argument("--events", type=int, default=100, help="token events per stream")
    parser.add_argument("--interval-ms", type=int, default=10, help="between token events")
    parser.add_argument("--rounds", type=int, default=1, help="streams per slot, one after another")
    parser.add_argument("--stagger", type=float, help="seconds over which the slots start (default: one stream's length)")
    args = parser.parse_args()
    if args.streams * args.rounds > 20_000 or args.events > 10_000:
        parser.error("too many streams or events for one bounded run")
    result = uvloop.run(run(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
