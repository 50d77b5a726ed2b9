"""An open-loop load client: POSTs at a fixed rate whatever the answers do, and times each one.

Requests leave on a fixed schedule (request i at t0 + i / rate), each on an idle keep-alive
connection or a new one, so a slow answer never delays the next request (no coordinated
omission). Latency runs from the moment a request is written to the moment its last byte is
read; how late the client itself sent (timer jitter) is reported apart as `send_lag`, so that
the client's own scheduling is not charged to the server. The client is a bare asyncio
protocol on uvloop that reads `Content-Length` answers, so it adds as little as it can.
Prints one JSON object.

    python -m bench.openloop --url http://127.0.0.1:8080/v1/chat/completions --rate 100 --duration 10 --key lt_...
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from urllib.parse import urlsplit

import orjson
import uvloop

from bench.stats import percentile

BODY = (
    b'{"model":"%s","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Say hello in one word."}],"max_tokens":16,"temperature":0.2}'
)


class _Connection(asyncio.Protocol):
    """One keep-alive connection that carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._need: int | None = None
        self._status = 0
        self._waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._need is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            self._status = int(head[9:12])
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self._fail(ConnectionError("an answer without Content-Length"))
                return
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            self._need = end + 4 + length
        if len(self._buffer) >= self._need:
            del self._buffer[: self._need]
            self._need = None
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(self._status)

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("connection closed"))


async def run(url: str, rate: float, duration: float, key: str | None, model: str, warmup: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = BODY % model.encode()
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(body)}"]  # fmt: skip
    if key:
        head.append(f"Authorization: Bearer {key}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    idle: list[_Connection] = []
    opened = 0

    async def connection() -> _Connection:
        nonlocal opened
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        _, conn = await loop.create_connection(_Connection, host, port)
        opened += 1
        return conn

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    async def one(record: bool) -> None:
        conn = await connection()
        sent = time.perf_counter()
        try:
            status = await asyncio.wait_for(conn.send(request), timeout=10)
        except (ConnectionError, TimeoutError) as exc:
            errors.append(type(exc).__name__)
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            return
        elapsed = time.perf_counter() - sent
        idle.append(conn)
        if record:
            latencies.append(elapsed)
            statuses[status] = statuses.get(status, 0) + 1

    for _ in range(warmup):  # open a few connections and warm both ends
        await asyncio.gather(*(one(False) for _ in range(4)))

    total = int(rate * duration)
    tasks: list[asyncio.Task[None]] = []
    lags: list[float] = []
    start = time.perf_counter() + 0.01
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - due)
        tasks.append(loop.create_task(one(True)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    elapsed = time.perf_counter() - start
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    ms = [x * 1000 for x in latencies]
    return {
        "sent": total,
        "answered": len(latencies),
        "errors": len(errors),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "achieved_rate": round(total / elapsed, 2),
        "connections": opened,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
        "send_lag_p99_ms": percentile([x * 1000 for x in lags], 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (bounded)")
    parser.add_argument("--key")
    parser.add_argument("--model", default="bench-json")
    parser.add_argument("--warmup", type=int, default=25, help="rounds of 4 requests before measuring")
    args = parser.parse_args()
    if args.rate * args.duration > 1_000_000:
        parser.error("more than 1,000,000 requests: lower --rate or --duration")
    result = uvloop.run(run(args.url, args.rate, args.duration, args.key, args.model, args.warmup))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
