"""An upstream event stream relayed to the client in callbacks, as its bytes arrive.

`EventPipe.body` is the body callback of an `UpstreamResponse` (`gateway/upstream/client.py`):
each piece the upstream sends goes through the SSE cutter (`SSERelay.feed`: whole events only,
usage read, nothing re-encoded) and straight to the client's transport, framed as an HTTP/1.1
chunk, inside the upstream connection's `data_received`. The handler only awaits the outcome
(`wait`):

- `done`: the upstream's body is complete;
- `cut`: the upstream's connection broke (or the drain closed it);
- `idle`: no byte for `first_byte` seconds after the head, then `idle` seconds between pieces;
- `client_gone`: the client's connection closed;
- `paused`: the client reads more slowly than the upstream sends. The upstream's reading is
  paused until the handler has drained the client's buffer (`resume`), so a slow client holds
  at most the two sockets' buffers, never a growing queue in the gateway.
"""

from __future__ import annotations

import asyncio

from gateway.api.sse import SSERelay
from gateway.upstream.client import UpstreamResponse

DONE, CUT, IDLE, CLIENT_GONE, PAUSED = "done", "cut", "idle", "client_gone", "paused"


class EventPipe:
    __slots__ = (
        "_loop", "_transport", "_chunked", "_sse", "_upstream", "_high", "_wait", "_idle", "_last",
        "_timer", "_outcome", "_paused", "_pause_news", "_waiter",
    )  # fmt: skip

    def __init__(
        self,
        transport: asyncio.Transport,
        chunked: bool,
        sse: SSERelay,
        upstream: UpstreamResponse,
        first_byte: float,
        idle: float,
    ) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._transport = transport
        self._chunked = chunked  # HTTP/1.0 clients get the bare bytes, ended by the close
        self._sse = sse
        self._upstream = upstream
        self._high = transport.get_write_buffer_limits()[1]
        self._wait = first_byte
        self._idle = idle
        self._last = loop.time()
        self._timer: asyncio.TimerHandle | None = loop.call_at(self._last + first_byte, self._check_idle)
        self._outcome: str | None = None  # the final one
        self._paused = False
        self._pause_news = False  # paused, and the handler has not heard yet
        self._waiter: asyncio.Future[None] | None = None

    def body(self, data: bytes) -> None:
        self._last = self._loop.time()
        self._wait = self._idle
        out = self._sse.feed(data)
        if not out or self._outcome is not None:
            return  # nothing whole yet, or the relay is over
        transport = self._transport
        if transport.is_closing():
            self._signal(CLIENT_GONE)
            return
        transport.write(b"%x\r\n%b\r\n" % (len(out), out) if self._chunked else out)
        if not self._paused and transport.get_write_buffer_size() > self._high:
            self._paused = self._pause_news = True
            self._upstream.pause_reading()
            self._wake()

    def end(self, error: Exception | None) -> None:
        self._signal(DONE if error is None else CUT)

    async def wait(self) -> str:
        """The next outcome; after `paused`, drain the client and call `resume`."""
        if self._outcome is None and not self._pause_news:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._outcome is not None:
            return self._outcome
        self._pause_news = False
        return PAUSED

    def resume(self) -> None:
        self._paused = False
        self._last = self._loop.time()  # the time spent waiting for the client is not the upstream's
        self._upstream.resume_reading()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._outcome = self._outcome or CLIENT_GONE

    def _signal(self, outcome: str) -> None:
        if self._outcome is None:  # the first one stands
            self._outcome = outcome
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_idle(self) -> None:
        self._timer = None
        if self._outcome is not None:
            return
        now = self._loop.time()
        due = (now if self._paused else self._last) + self._wait
        if now + 0.001 < due:
            self._timer = self._loop.call_at(due, self._check_idle)
            return
        self._signal(IDLE)
