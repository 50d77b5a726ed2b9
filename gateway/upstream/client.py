"""HTTP/1.1 to the model servers: pooled keep-alive connections, responses parsed by httptools.

The chat route's upstream client. `UpstreamClient.post` sends a request and returns once the
response's head has arrived; the body is then either read whole (`UpstreamResponse.read`) or
handed, piece by piece as it arrives, to a callback (`UpstreamResponse.deliver`) that runs
inside the connection's `data_received`. A streamed event so costs one C parse and one call,
with no future, task step or reader object per event (aiohttp's client spends all three), which
is most of why the gateway relays an event with less CPU than a bare aiohttp pass-through
(BENCHMARKS.md).

A connection goes back to its upstream's idle pool when a response is complete and both sides
allow keep-alive; idle ones are closed after `KEEPALIVE_SECONDS` or as soon as the server
closes them. A request whose reused connection turns out to have been closed by the server
before a byte of the answer came is sent once more on a new connection (the race every
keep-alive client has with a server's idle timeout). Bodies in `gzip` or `deflate` are
decompressed; the gateway asks for `identity`.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

KEEPALIVE_SECONDS = 30.0
MAX_IDLE_PER_UPSTREAM = 1024
MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and header fields
MAX_READ_BYTES = 64 * 1024 * 1024  # a body read whole (a JSON answer); streams have no limit

BodySink = Callable[[bytes], None]
EndSink = Callable[[Exception | None], None]


class UpstreamConnectError(Exception):
    """No connection could be made: refused, unreachable, unresolvable, TLS failed, timed out."""


class UpstreamBroken(Exception):
    """The connection broke, or what came back is not an HTTP/1.1 response."""


class Target:
    """Where requests for one upstream URL go: host, port, TLS and the request target."""

    __slots__ = ("host", "port", "tls", "path", "authority", "key")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.authority = parts.netloc.rpartition("@")[2]
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.key = (self.host, self.port, self.tls)


def request_head(target: Target, headers: Mapping[str, str], length: int) -> bytes:
    """The request line and header block of a POST with a `length`-byte body."""
    lines = [f"POST {target.path} HTTP/1.1\r\nHost: {target.authority}\r\nContent-Length: {length}\r\n"]
    for name, value in headers.items():
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent: it contains a line break or colon")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")  # the bytes aiohttp's parser decoded


class UpstreamResponse:
    """One response: its status and headers once `post` returns, then its body.

    Also the httptools callback object of the connection's parser while it is being received.
    """

    __slots__ = (
        "status", "headers", "_raw", "_parser", "_conn", "_loop", "_head", "_done", "_chunks", "_sink",
        "_end", "_complete", "_error", "_until_close", "_decoder", "_closed", "received",
    )  # fmt: skip

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._raw: list[tuple[bytes, bytes]] = []
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._conn: _Connection | None = conn
        self._loop = loop
        self._head: asyncio.Future[None] = loop.create_future()
        self._done: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._sink: BodySink | None = None
        self._end: EndSink | None = None
        self._complete = False
        self._error: Exception | None = None
        self._until_close = False  # the body ends when the server closes the connection
        self._decoder: Any = None
        self._closed = False
        self.received = 0  # bytes of this response received so far

    @property
    def content_type(self) -> str:
        """The media type, lower case, as aiohttp reports it (`application/octet-stream` if none)."""
        raw = self.headers.get("Content-Type")
        return raw.split(";", 1)[0].strip().lower() if raw else "application/octet-stream"

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        if self._parser is None:
            raise UpstreamBroken("an answer nobody asked for")
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and other interim answers: the real one follows
            self._raw.clear()
            return
        self.status = status
        headers = self.headers
        size = 0
        for name, value in self._raw:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            size += len(name) + len(value)
        if size > MAX_HEAD_BYTES:
            raise UpstreamBroken(f"the upstream's header fields exceed {MAX_HEAD_BYTES} bytes")
        self._raw.clear()
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding != "identity":
            raise UpstreamBroken(f"unsupported content-encoding {encoding!r}")
        self._until_close = "Content-Length" not in headers and "Transfer-Encoding" not in headers and status not in (204, 304)
        self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            body = self._decoder.decompress(body)
            if not body:
                return
        if self._sink is not None:
            self._sink(body)
        else:
            self._chunks.append(body)
            if self.received > MAX_READ_BYTES:
                raise UpstreamBroken(f"the upstream's answer exceeds {MAX_READ_BYTES} bytes")

    def on_message_complete(self) -> None:
        if not self.status or self._parser is None:  # the end of an interim answer
            return
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.finished(self._parser.should_keep_alive())
        self._ended(None)

    # --- the connection's news ---

    def _data(self, data: bytes) -> None:
        self.received += len(data)
        if self._parser is not None:
            self._parser.feed_data(data)
            if self.received > MAX_HEAD_BYTES and not self._head.done():
                raise UpstreamBroken(f"the upstream's answer has no end of its head within {MAX_HEAD_BYTES} bytes")

    def _lost(self, exc: Exception | None) -> None:
        self._conn = None
        if self._complete or self._error is not None:
            return
        if self.status and self._until_close and exc is None and not self._closed:
            self._ended(None)  # the server's close is the end of this body
            return
        if not self._head.done():
            self._parser = None
            self._head.set_exception(UpstreamBroken("the upstream closed the connection before answering"))
            return
        self._ended(UpstreamBroken("the upstream closed the connection before the end of the body"))

    def _fail(self, exc: Exception) -> None:
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.abort()
        if not self._head.done():
            self._parser = None
            self._head.set_exception(exc)
        elif not self._complete and self._error is None:
            self._ended(exc)

    def _ended(self, error: Exception | None) -> None:
        self._parser = None  # it refers to this object: no cycle left for the garbage collector
        if error is None:
            self._complete = True
            if self._decoder is not None:
                rest = self._decoder.flush()
                self._decoder = None
                if rest:
                    self.on_body(rest)
        else:
            self._error = error
        end = self._end
        if end is not None:
            self._sink = self._end = None  # the relay refers to this object
            end(error)
        elif self._done is not None and not self._done.done():
            self._done.set_result(None)

    # --- for the handler ---

    async def wait_head(self) -> None:
        await self._head

    async def read(self) -> bytes:
        """The whole body."""
        if not self._complete and self._error is None:
            self._done = self._loop.create_future()
            await self._done
        if self._error is not None:
            raise self._error
        return b"".join(self._chunks)

    def deliver(self, body: BodySink, end: EndSink) -> None:
        """From now on call `body(piece)` as the body arrives (first with what came already), then
        `end(None)` once it is complete or `end(error)` if the connection breaks."""
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            body(chunk)
        if self._complete or self._error is not None:
            end(self._error)
        else:
            self._sink, self._end = body, end

    def pause_reading(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    def close(self) -> None:
        """Done with this response: an unfinished one's connection is closed, never reused."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.abort()
            if not self._complete and self._error is None:
                self._ended(UpstreamBroken("the response was closed before its end"))


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "response", "idle_since", "_client", "_key", "_paused")

    def __init__(self, client: UpstreamClient, key: tuple[str, int, bool]) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.idle_since = 0.0
        self._client = client
        self._key = key
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, head: bytes, body: bytes, loop: asyncio.AbstractEventLoop) -> UpstreamResponse:
        assert self.transport is not None  # type narrowing: send() follows connection_made()
        response = self.response = UpstreamResponse(self, loop)
        self.transport.write(head + body)
        return response

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes while idle: nothing sane can follow on this connection
            self.abort()
            return
        try:
            response._data(data)
        except httptools.HttpParserCallbackError as exc:
            self.abort()  # whatever else came, this connection cannot be trusted any more
            cause = exc.__context__
            response._fail(cause if isinstance(cause, UpstreamBroken) else UpstreamBroken(f"relay failed: {cause!r}"))
        except httptools.HttpParserError as exc:
            self.abort()
            response._fail(UpstreamBroken(f"the upstream's answer is not HTTP/1.1: {exc}"))
        except UpstreamBroken as exc:
            self.abort()
            response._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._client._forget(self)
        response, self.response = self.response, None
        if response is not None:
            response._lost(exc)

    def finished(self, keep_alive: bool) -> None:
        """The response is complete: back to the pool, or closed."""
        self.response = None
        if self._paused:
            self.resume_reading()
        if keep_alive and self.transport is not None and not self.transport.is_closing():
            self._client._release(self, self._key)
        else:
            self.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamClient:
    """Keep-alive connections to every upstream, reused most recently used first."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._ssl = ssl_context
        self._sweep: asyncio.TimerHandle | None = None

    async def post(
        self, target: Target, body: bytes, headers: Mapping[str, str], connect_timeout: float | None = None
    ) -> UpstreamResponse:
        """POST `body` to `target`; the response once its head has arrived."""
        head = request_head(target, headers, len(body))
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            conn = self._reuse(target.key, loop.time())
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target, connect_timeout)
            response = conn.send(head, body, loop)
            try:
                await response.wait_head()
            except UpstreamBroken:
                if reused and attempt == 1 and response.received == 0:
                    continue  # the server closed it while idle, as we sent
                raise
            except BaseException:  # cancelled (a deadline, the client gone): the connection is spoiled
                response.close()
                raise
            return response
        raise AssertionError("unreachable")

    def _reuse(self, key: tuple[str, int, bool], now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing() and now - conn.idle_since < KEEPALIVE_SECONDS:
                return conn
            conn.abort()
        return None

    async def _connect(self, target: Target, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if target.tls:
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, target.key), target.host, target.port,
                    ssl=context, server_hostname=target.host if context else None,
                )  # fmt: skip
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from None
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection, key: tuple[str, int, bool]) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE_PER_UPSTREAM:
            conn.abort()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(KEEPALIVE_SECONDS, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for idle in self._idle.values():
            stale = [c for c in idle if now - c.idle_since >= KEEPALIVE_SECONDS]
            for conn in stale:
                idle.remove(conn)
                conn.abort()
        if any(self._idle.values()):
            self._sweep = asyncio.get_running_loop().call_later(KEEPALIVE_SECONDS, self._sweep_idle)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn._key)
        if idle and conn in idle:
            idle.remove(conn)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports report their close
