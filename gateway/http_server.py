"""The listeners' HTTP/1.1 protocol: aiohttp's, plus a deadline for request heads and JSON errors.

aiohttp's server has no timer for a client that sends its request line and headers slowly (or
nothing at all) on a connection it keeps open. `HeadDeadlineHandler` arms one `call_at` timer
when a connection opens, and when a byte of a new request arrives on a keep-alive connection;
the head must be complete `request_header_timeout` seconds later, or the client gets 408
`request_timeout` and the connection is closed. The timer is disarmed as soon as the parser
produces the request, so a request whose head arrives in one read costs no timer at all on a
keep-alive connection; idle keep-alive connections (no byte of a new request yet) stay under
`keepalive_timeout`, and request bodies under `request_body_timeout` (`api/chat.py`).

Heads that do not parse — a request line or header field over `max_header_bytes`, more than
`max_headers` fields, a bad request line, invalid header bytes — get the contract's JSON (431
`request_header_fields_too_large` or 400 `malformed_request`) with `Connection: close` instead of
aiohttp's plain text. `GatewayAppRunner` is `web.AppRunner` serving connections with this handler.

Written against aiohttp 3.14's `RequestHandler` (its message queue, waiter and `_ErrInfo`);
`tests/test_slow_headers.py` pins the behaviour on a real listener.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from gateway.errors import GatewayError, HeadersTooLarge, MalformedRequest, RequestTimeout, error_body

log = structlog.get_logger("liutong.http")


class HeadTimeout(Exception):
    """The request head did not arrive within `request_header_timeout`."""


class HeadDeadlineHandler(RequestHandler):
    """aiohttp's protocol with a deadline for request heads and the contract's JSON errors."""

    __slots__ = ("_head_timeout", "_head_timer", "_last_payload")

    def __init__(self, manager: web.Server, *, request_header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = request_header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the newest parsed request: while it is incomplete, bytes are body bytes.
        self._last_payload: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        last = self._last_payload
        RequestHandler.data_received(self, data)
        if self._request_count != count:  # a head is complete (or did not parse)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if self._messages:
                self._last_payload = self._messages[-1][1]
        # A read that ends one body and starts the next head arms nothing (the parser does not
        # say where the body ended); the next byte does, and `keepalive_timeout` bounds a head
        # that stops there.
        elif (
            self._head_timer is None
            and data
            and (last is None or last.is_eof())  # not body bytes: the start of a new request
            and not (self._close or self._force_close or self._upgraded or self._payload_parser)
        ):
            self._arm()

    def _arm(self) -> None:
        loop = self._loop
        self._head_timer = loop.call_at(loop.time() + self._head_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._close or self._force_close or self.transport is None:
            return
        self._close = True  # read (and parse) nothing more on this connection
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._messages:
            # Idle between requests: answer 408 through aiohttp's own error path.
            message = f"The request headers were not received within {self._head_timeout:g} s."
            self._messages.append((_ErrInfo(status=408, exc=HeadTimeout(message), message=message), EMPTY_PAYLOAD))
            waiter.set_result(None)
        # Otherwise a pipelined request is being answered; the connection closes after it.

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The contract's JSON for a head that did not parse or arrive, and for a handler failure
        that escaped the middleware; the connection is closed after it."""
        if request.writer.output_size > 0:  # as aiohttp: a response has begun, it cannot be replaced
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        error = self._error_for(status, exc)
        if error.status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        elif not (isinstance(exc, BadHttpMethod) and self._request_count == 1):  # TLS or junk on an HTTP port
            log.info("request_head_rejected", status=error.status, code=error.code, error=type(exc).__name__,
                     peer=request.remote)  # fmt: skip
        response = web.Response(
            status=error.status,
            body=error_body(error.message, error.type, error.param, error.code),
            content_type="application/json",
            headers={"Connection": "close"},
        )
        response.force_close()
        return response

    def _error_for(self, status: int, exc: BaseException | None) -> GatewayError:
        if isinstance(exc, HeadTimeout):
            return RequestTimeout(str(exc))
        if isinstance(exc, LineTooLong):
            return HeadersTooLarge(f"The request line or a header field is longer than {self.max_field_size} bytes.")
        if isinstance(exc, HttpProcessingError):
            if exc.message == "Too many headers received":
                return HeadersTooLarge(f"The request has more than {self.max_headers} header fields.")
            # aiohttp's message: llhttp's reason, then the offending bytes; a bad request line
            # comes as "Bad status line:" first.
            lines = [line.strip().rstrip(":") for line in exc.message.splitlines() if line.strip()]
            if len(lines) > 1 and lines[0] == "Bad status line":
                lines[0] = "bad request line: " + lines[1]
            reason = lines[0][:200] if lines else "unreadable request head"
            return MalformedRequest(f"The request is not valid HTTP/1.1 ({reason}).")
        error = GatewayError("The gateway failed to handle the request.")
        error.status = status
        return error


class _HeadDeadlineServer(web.Server):
    """A `web.Server` (aiohttp's protocol factory) whose connections get `HeadDeadlineHandler`."""

    def __init__(self, base: web.Server, request_header_timeout: float) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **base._kwargs,
        )
        self._head_timeout = request_header_timeout

    def __call__(self) -> RequestHandler:
        return HeadDeadlineHandler(self, loop=self._loop, request_header_timeout=self._head_timeout, **self._kwargs)


class GatewayAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections have a deadline for request heads (`request_header_timeout`
    seconds) and answer unparsable heads with the contract's JSON. Other keyword arguments are
    aiohttp's (`keepalive_timeout`, `max_line_size`, `max_field_size`, `max_headers`, …)."""

    __slots__ = ("_head_timeout",)

    def __init__(self, app: web.Application, *, request_header_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout = request_header_timeout

    async def _make_server(self) -> web.Server:
        return _HeadDeadlineServer(await super()._make_server(), self._head_timeout)
