"""`POST /v1/chat/completions`: authenticate → validate → limit → forward → settle.

The handler reads like the request's story. Whatever happens after admission (a JSON answer,
a stream relayed event by event, an upstream failure, the client going away and cancelling
the handler), its `finally` hands one settlement to the usage writer: the tpm reconciliation,
the release of the concurrency lease and, when the request reached an upstream, its usage
record. Record statuses: the HTTP status sent, except 499 when the client went away and
502/504 when the upstream broke or stalled after a stream had begun.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

from gateway.api.relay import CLIENT_GONE, CUT, DONE, IDLE, EventPipe
from gateway.api.settle import json_usage, settle
from gateway.api.sse import SSERelay
from gateway.api.validation import ChatRequest, parse_chat_request, upstream_body
from gateway.api.watch import IdleWatch
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    Draining,
    ModelNotFound,
    RequestTimeout,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
    error_body,
)
from gateway.limits.buckets import Grant
from gateway.state import EXCHANGE, STATE, AppState, Exchange
from gateway.upstream.caller_jwt import caller_header
from gateway.upstream.client import UpstreamBroken, UpstreamConnectError, UpstreamResponse
from gateway.upstream.pool import Pool, Upstream
from gateway.upstream.prefix_index import PromptBlocks

# RFC 9110 §7.6.1 hop-by-hop fields, plus what the gateway sets itself or must never forward.
_NOT_FORWARDED = frozenset((
    "content-encoding", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "content-length", "authorization", "cookie",
    "accept-encoding", "expect", "x-request-id", "content-type",
))  # fmt: skip
_NOT_RETURNED = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "content-encoding", "date", "server",
    "set-cookie", "x-request-id",
))  # fmt: skip


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def upstream_headers(request: web.Request, request_id: str, api_key: str | None) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    connection_tokens = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in _NOT_FORWARDED or lower in connection_tokens:
            continue
        headers.add(name, value)
    headers["Content-Type"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    headers["x-request-id"] = request_id
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _returned_headers(upstream: Any, extra: dict[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    connection_tokens = {t.strip().lower() for t in upstream.headers.get("Connection", "").split(",")}
    for name, value in upstream.headers.items():
        lower = name.lower()
        if lower in _NOT_RETURNED or lower in connection_tokens or lower.startswith("x-ratelimit-"):
            continue
        headers.add(name, value)
    headers.update(extra)
    return headers


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    ex = request[EXCHANGE]
    if state.draining:
        raise Draining("The gateway is shutting down; retry on another replica.")
    content_type = request.headers.get("Content-Type")
    if content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {content_type!r}.")
    if request.content_length is not None and request.content_length > state.settings.max_body_bytes:
        raise BodyTooLarge(f"The request body exceeds {state.settings.max_body_bytes} bytes.")

    record = await state.auth.authenticate(request.headers.get("Authorization"))
    ex.key_id, ex.org = record.key_id, record.org
    try:
        if request.content.is_eof():  # the whole body came with the headers: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(state.settings.request_body_timeout):
                raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"The request body was not received within {state.settings.request_body_timeout:g} s.",
            headers={"Connection": "close"},
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"The request body exceeds {state.settings.max_body_bytes} bytes.") from None
    except web.RequestPayloadError:  # a broken transfer, or a body that does not decompress
        raise BadRequest("The request body could not be read (broken transfer or content encoding).") from None
    chat = parse_chat_request(raw)
    ex.stream = chat.stream
    pool = state.pools.get(chat.model)
    if pool is None or not record.allows_model(chat.model):
        raise ModelNotFound(f"The model `{chat.model}` does not exist or you do not have access to it.")
    ex.model = chat.model

    plan = await state.plan_for(record)
    completion_allowance = (chat.max_tokens or state.settings.default_max_tokens) * chat.n
    reserve = state.limiter.reservation(plan, chat.prompt_estimate + completion_allowance, chat.max_tokens is not None)
    if state.limiter.overlappable(plan, reserve):  # forward while the store decides
        admission = state.limiter.admit_overlapped(plan, ex.request_id, reserve)
        return await _forward(request, state, ex, chat, raw, pool, admission)
    try:
        grant = await state.limiter.acquire(plan, ex.request_id, reserve)
    except Exception:
        ex.limited = True
        raise
    return await _forward(request, state, ex, chat, raw, pool, grant)


async def _admitted(ex: Exchange, admission: asyncio.Future[Grant]) -> Grant:
    """The store's verdict on an overlapped request (it keeps running if the client leaves)."""
    try:
        grant = admission.result() if admission.done() else await asyncio.shield(admission)
    except Exception:
        ex.limited = True
        raise
    ex.ratelimit_headers = grant.headers
    return grant


def _settle_when_admitted(admission: asyncio.Future[Grant], settle: Callable[[Grant], None]) -> None:
    """Settle an overlapped request once its verdict arrives; nothing to settle if denied."""

    def done(future: asyncio.Future[Grant]) -> None:
        if not future.cancelled() and future.exception() is None:
            settle(future.result())

    admission.add_done_callback(done)


class _Attempt:
    """Where the request went: the upstream chosen, and whether the model may have seen it."""

    __slots__ = ("upstream", "reached")

    def __init__(self) -> None:
        self.upstream: Upstream | None = None
        self.reached = False

    def take(self, upstream: Upstream) -> None:
        """Count this request against `upstream` (and no longer against the previous one)."""
        self.release()
        upstream.outstanding += 1
        self.upstream = upstream

    def release(self) -> None:
        if self.upstream is not None:
            self.upstream.outstanding -= 1
            self.upstream = None


async def _open_upstream(
    state: AppState,
    pool: Pool,
    model: str,
    body: bytes,
    headers: CIMultiDict[str],
    attempt: _Attempt,
    prompt: PromptBlocks | None = None,
) -> UpstreamResponse:
    """POST to the pool until one upstream answers; the response (headers read).

    Another upstream is tried only while the model cannot have seen the request: the connection
    failed, or the upstream answered 503 (it refused the work). Bounded by `upstream_retries`
    and, with the whole loop, by the first-byte deadline.
    """
    connect_timeout = pool.route.timeouts.connect
    tried: list[Upstream] = []
    while True:
        upstream = pool.pick(avoid=tried, prompt=prompt)
        tried.append(upstream)
        attempt.take(upstream)
        can_retry = len(tried) <= state.settings.upstream_retries and len(tried) < len(pool.upstreams)
        try:
            response = await state.upstream_http.post(upstream.target, body, headers, connect_timeout)
        except UpstreamConnectError:
            _upstream_failed(state, pool, upstream, model, "connect")
            if can_retry:
                continue
            raise UpstreamError("The upstream model server refused the connection.") from None
        except UpstreamBroken:
            attempt.reached = True
            _upstream_failed(state, pool, upstream, model, "connection")
            raise UpstreamError("The upstream model server broke the connection.") from None
        if response.status == 503 and can_retry:
            _upstream_failed(state, pool, upstream, model, "status_503")
            response.close()
            continue
        attempt.reached = True
        return response


async def _forward(
    request: web.Request,
    state: AppState,
    ex: Exchange,
    chat: ChatRequest,
    raw: bytes,
    pool: Pool,
    admission: Grant | asyncio.Future[Grant],
) -> web.StreamResponse:
    """Send the request upstream and relay the answer. `admission` is the grant, or the store's
    verdict still on its way (overlapped admission): it is awaited before the client sees a byte."""
    if isinstance(admission, Grant):
        grant: Grant | None = admission
        ex.ratelimit_headers = admission.headers
    else:
        grant = None
    timeouts = pool.route.timeouts
    metrics = state.metrics
    inflight = metrics.child(metrics.inflight, chat.model)
    inflight.inc()
    state.inflight += 1
    attempt = _Attempt()
    relay: SSERelay | None = None
    usage: dict[str, Any] | None = None
    json_estimate: int | None = None  # completion tokens counted in a JSON answer without usage
    record_status = 0
    upstream_response: UpstreamResponse | None = None
    ex.forwarded_at = forwarded_at = time.perf_counter()
    watch = IdleWatch()  # the first-byte, total and idle deadlines, one timer for all
    if grant is None:
        admission.add_done_callback(watch.interrupt)  # type: ignore[union-attr]
    try:
        headers = upstream_headers(request, ex.request_id, pool.route.api_key)
        if pool.route.caller_jwt is not None:  # who is calling, signed, instead of the client's key
            name, token = caller_header(pool.route.caller_jwt, key_id=ex.key_id or "", org=ex.org,
                                        model=chat.model, request_id=ex.request_id)  # fmt: skip
            headers[name] = token
        try:
            watch.reading(timeouts.first_byte)
            prompt = pool.prompt_of(chat.body["messages"])  # the prompt's blocks, when the routing needs them
            upstream_response = await _open_upstream(
                state, pool, chat.model, upstream_body(raw, chat), headers, attempt, prompt
            )
            watch.writing()
        except asyncio.CancelledError:
            if not watch.expired_now():
                raise
            if grant is None and admission.done():  # type: ignore[union-attr]
                grant = await _admitted(ex, admission)  # type: ignore[arg-type]  # a denial raises here
            attempt.reached = True
            if attempt.upstream is not None:
                _upstream_failed(state, pool, attempt.upstream, chat.model, "timeout")
            raise UpstreamTimeout("The upstream model server did not answer in time.") from None
        if grant is None:
            grant = await _admitted(ex, admission)  # type: ignore[arg-type]
        upstream = attempt.upstream
        assert upstream is not None  # type narrowing: _open_upstream returned, so it took one
        metrics.child(metrics.ttft, chat.model).observe(time.perf_counter() - forwarded_at)
        if upstream_response.status >= 500:
            _upstream_failed(state, pool, upstream, chat.model, f"status_{upstream_response.status}")
        else:
            pool.succeeded(upstream)
        is_sse = upstream_response.content_type == "text/event-stream"
        if chat.stream and upstream_response.status == 200 and is_sse:
            relay = SSERelay(hide_usage=not chat.wants_usage)
            watch.close()  # the stream's own deadlines are `EventPipe`'s
            record_status = await _relay_stream(request, state, ex, chat, upstream_response, relay)
            usage = relay.usage
            ex.status = 200
            return ex.response  # type: ignore[no-any-return]
        try:
            watch.reading(max(0.0, timeouts.total - (time.perf_counter() - forwarded_at)))
            payload = await upstream_response.read()
            watch.writing()
        except asyncio.CancelledError:
            if not watch.expired_now():
                raise
            _upstream_failed(state, pool, upstream, chat.model, "timeout")
            raise UpstreamTimeout("The upstream model server did not finish in time.") from None
        except UpstreamBroken:
            _upstream_failed(state, pool, upstream, chat.model, "connection")
            raise UpstreamError("The upstream model server broke the connection.") from None
        ex.upstream_done_at = time.perf_counter()
        record_status = upstream_response.status
        if record_status == 200:
            usage, json_estimate = json_usage(payload)
        headers = _returned_headers(upstream_response, grant.headers)
        headers["x-request-id"] = ex.request_id
        response = web.Response(status=record_status, body=payload, headers=headers)
        # Written here, so that the usage record, the metrics and the access log come after
        # the client has its answer rather than before.
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:  # the client left; the upstream's work is still recorded
            ex.status = 499
        return response
    except asyncio.CancelledError:
        if ex.upstream_done_at is None:  # else the client left during the write of a finished answer
            record_status = 499
        raise
    except Exception as exc:
        if grant is None:  # the verdict first: its headers go on the error, and a denial answers instead
            grant = await _admitted(ex, admission)  # type: ignore[arg-type]
        if not record_status:
            record_status = getattr(exc, "status", 500)
        raise
    finally:
        watch.close()
        if upstream_response is not None:
            upstream_response.close()
        attempt.release()
        inflight.dec()
        state.inflight -= 1
        if grant is not None:
            settle(state, ex, chat, grant, attempt.reached, record_status or 500, usage, relay, json_estimate)
        else:  # the client left before the verdict arrived, or it denied the request
            _settle_when_admitted(admission, functools.partial(  # type: ignore[arg-type]
                settle, state, ex, chat, reached=attempt.reached, status=record_status or 500, usage=usage,
                relay=relay, json_estimate=json_estimate))  # fmt: skip


async def _relay_stream(
    request: web.Request,
    state: AppState,
    ex: Exchange,
    chat: ChatRequest,
    upstream_response: UpstreamResponse,
    relay: SSERelay,
) -> int:
    """Relay the upstream's events to the client as they arrive; the status to record."""
    headers = _returned_headers(upstream_response, ex.ratelimit_headers)
    headers["Cache-Control"] = "no-cache"
    headers["x-request-id"] = ex.request_id
    response = web.StreamResponse(status=200, headers=headers)
    ex.response = response
    writer = await response.prepare(request)
    transport = request.transport
    if not isinstance(writer, StreamWriter) or transport is None or transport.is_closing():
        return 499
    writer.send_headers()  # the events go to the transport directly (`EventPipe`)
    timeouts = state.pools[chat.model].route.timeouts
    pipe = EventPipe(transport, writer.chunked, relay, upstream_response, timeouts.first_byte, timeouts.idle)
    state.streams.add(upstream_response)
    try:
        upstream_response.deliver(pipe.body, pipe.end)
        while (outcome := await pipe.wait()) not in (DONE, CUT, IDLE, CLIENT_GONE):
            await writer.drain()
            pipe.resume()
    except ConnectionResetError:  # the client went away while its buffer drained
        return 499
    finally:
        pipe.close()
        state.streams.discard(upstream_response)
    if outcome == CLIENT_GONE:
        return 499
    failure: tuple[str, str, int] | None = None
    rest = b""
    if outcome == DONE:
        rest = relay.rest()
        if not relay.done:
            failure = ("upstream_unavailable", "The upstream ended the stream before [DONE].", 502)
    elif outcome == IDLE:
        failure = ("upstream_timeout", "The upstream stopped sending events.", 504)
    else:
        failure = ("upstream_unavailable", "The upstream broke the connection mid-stream.", 502)
    if failure is not None and state.drain_expired:
        failure = ("draining", "The gateway is shutting down; the stream was cut at the end of its grace period.", 503)
    if failure is not None:
        code, message, status = failure
        reason = {"upstream_timeout": "idle_timeout", "draining": "drained"}.get(code, "stream_cut")
        state.metrics.upstream_errors.labels(chat.model, reason).inc()
    try:
        if rest:
            await response.write(rest)
        if failure is not None:
            await response.write(b"data: " + error_body(message, "upstream_error", None, code) + b"\n\n")
        await response.write_eof()
    except ConnectionResetError:
        return 499
    ex.upstream_done_at = time.perf_counter()
    return failure[2] if failure else 200


def _upstream_failed(state: AppState, pool: Pool, upstream: Upstream, model: str, reason: str) -> None:
    pool.failed(upstream)
    state.metrics.upstream_errors.labels(model, reason).inc()
