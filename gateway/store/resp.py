"""A lean pipelined Redis client for the request path (one server, `redis://` or `rediss://`).

redis-py takes a pooled connection, a lock and two timers for every command, and encodes each
argument in Python: about a quarter of the gateway's CPU per request. Here every caller queues
its command on one shared connection and waits on a future; what is queued in one turn of the
event loop is written in one syscall, replies come back in order and are matched first-in
first-out. hiredis (C) packs the commands and parses the replies.

Timeouts cost no timer per command: while commands wait, one timer is armed at the oldest
one's deadline, and when that passes the connection is aborted, failing every command on it
with `TimeoutError` (their replies could no longer be matched). Errors are redis-py's
exception classes, so callers handle both clients alike: `ConnectionError`/`TimeoutError`
when the server cannot be reached, `ResponseError`/`NoScriptError` for error replies. The
next command after a failure connects again. Cluster and Sentinel deployments use redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_Reply = Any


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class _Connection(asyncio.Protocol):
    """One socket to the server: futures waiting for replies, in the order commands were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader(replyError=hiredis.ReplyError)
        self._waiting: deque[tuple[asyncio.Future[_Reply], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while waiting:
            reply = self._reader.gets()
            if reply is False:
                return
            future = waiting.popleft()[0]
            if not future.done():
                future.set_result(reply)
        if self._reader.gets() is not False:  # a reply nobody asked for: the stream is out of step
            self._fail(RedisConnectionError("Redis sent a reply that no command was waiting for"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Connection to Redis lost{f': {exc}' if exc else ''}"))

    def send(self, packed: bytes) -> asyncio.Future[_Reply]:
        """Queue one packed command; its reply's future."""
        self.write(packed)
        return self.expect()

    def expect(self) -> asyncio.Future[_Reply]:
        future = self._loop.create_future()
        self._waiting.append((future, self._loop.time() + self._timeout))
        if self._timer is None:
            self._timer = self._loop.call_at(self._waiting[0][1], self._check)
        return future

    def write(self, packed: bytes) -> None:
        """Queue bytes for the socket: what every caller queues in one turn of the event loop
        goes out in one syscall, at the end of that turn."""
        if self.lost is not None or self._transport is None:
            raise RedisConnectionError("Connection to Redis closed")
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(packed)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.lost is None and self._transport is not None:
            self._transport.write(b"".join(out))

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        due = self._waiting[0][1]
        if self._loop.time() >= due:
            self._fail(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))
        else:
            self._timer = self._loop.call_at(due, self._check)

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(RedisConnectionError("Connection to Redis closed by the client"))


class RespClient:
    """Commands pipelined on one connection, opened on first use and after any failure."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 0.5,
    ) -> None:
        self._address = (host, port)
        self._db = db
        self._username = username
        self._password = password
        self._tls = tls
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def _connected(self) -> _Connection:
        connection = self._connection
        if connection is not None and connection.lost is None:
            return connection
        if self._connecting is None:  # one connect attempt, shared by every caller waiting on it
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = self._address
        try:
            async with asyncio.timeout(self._timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._timeout), host, port, ssl=self._tls
                )
                hello: list[tuple[Any, ...]] = []
                if self._password is not None:
                    hello.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
                if self._db:
                    hello.append(("SELECT", self._db))
                for command in hello:
                    reply = await connection.send(hiredis.pack_command(command))
                    if isinstance(reply, hiredis.ReplyError):
                        connection.close()
                        raise _error(reply)
        except TimeoutError:
            raise RedisTimeoutError(f"Connecting to Redis at {host}:{port} timed out") from None
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to Redis at {host}:{port}: {exc.strerror or exc}") from None
        self._connection = connection
        return connection

    async def execute(self, *args: Any) -> _Reply:
        """One command; an error reply raises."""
        connection = await self._connected()
        reply = await connection.send(hiredis.pack_command(args))
        if isinstance(reply, hiredis.ReplyError):
            raise _error(reply)
        return reply

    def send_now(self, *args: Any) -> asyncio.Future[_Reply] | None:
        """One command, without awaiting anything: its reply (an error reply as a
        `hiredis.ReplyError` value), or None when there is no open connection to send it on."""
        connection = self._connection
        if connection is None or connection.lost is not None:
            return None
        return connection.send(hiredis.pack_command(args))

    async def execute_many(self, commands: Sequence[tuple[Any, ...]]) -> list[_Reply]:
        """Several commands in one write; each error reply is returned in its place (as a
        `ResponseError`), a connection failure raises."""
        if not commands:
            return []
        connection = await self._connected()
        connection.write(b"".join([hiredis.pack_command(c) for c in commands]))
        futures = [connection.expect() for _ in commands]
        replies = await asyncio.gather(*futures)
        return [_error(r) if isinstance(r, hiredis.ReplyError) else r for r in replies]

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
