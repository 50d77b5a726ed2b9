"""The composition root: `create_app` builds every service, wires the routes and middleware.

One middleware gives each request its `x-request-id`, turns `GatewayError`s (and aiohttp's own
HTTP errors) into the contract's JSON, counts each answer once in the metrics and writes the
request's one access-log line. The upstream clients, the store, the usage writer and
the store monitor open and close in `cleanup_ctx`. With `admin_listen` set, `/metrics` moves to
the admin app (`create_admin_app`); `/healthz` and `/readyz` answer on both.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import structlog
from aiohttp import web

from gateway.admin.routes import setup_admin
from gateway.api.chat import chat_completions
from gateway.api.openapi import openapi_handler
from gateway.config import Settings
from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    InvalidApiKey,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    error_body,
)
from gateway.keys.auth import Authenticator
from gateway.keys.events import Events, Subscriber
from gateway.keys.records import KeyService
from gateway.limits.buckets import Limiter
from gateway.logs import info_line
from gateway.metrics import Metrics
from gateway.state import EXCHANGE, STATE, AppState, Exchange
from gateway.store.client import Store, open_store
from gateway.store.topology import ping_primaries
from gateway.upstream.load import export_load_sources, run_load_polls
from gateway.upstream.pool import build_pools, run_health_checks
from gateway.usage.records import UsageRecord
from gateway.usage.spool import open_spool
from gateway.usage.writer import UsageWriter

log = structlog.get_logger("liutong.gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id_for(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return "req_" + os.urandom(12).hex()


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers)


@web.middleware
async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    ex = Exchange(request_id_for(request))
    request[EXCHANGE] = ex
    response: web.StreamResponse | None = None
    try:
        try:
            response = await handler(request)
        except GatewayError as exc:
            response = _error_response(state, ex, exc)
        except web.HTTPException as exc:
            response = _http_error_response(exc)
        except asyncio.CancelledError:
            ex.status = 499
            raise
        except Exception:
            log.exception("unhandled_error", request_id=ex.request_id)
            response = web.Response(
                status=500,
                body=error_body("The gateway failed to handle the request.", "server_error"),
                content_type="application/json",
            )
        if not response.prepared:
            response.headers["x-request-id"] = ex.request_id
            for name, value in ex.ratelimit_headers.items():
                response.headers.setdefault(name, value)
        ex.status = ex.status if response.prepared and ex.status else response.status
        return response
    finally:
        _account(state, request, ex)


def _error_response(state: AppState, ex: Exchange, exc: GatewayError) -> web.Response:
    ex.error_code = exc.code or exc.type
    headers = dict(exc.headers)
    if isinstance(exc, RateLimited):
        model = state.metrics.label(ex.model or "")
        state.metrics.ratelimited.labels(model, exc.limit).inc()
        state.metrics.ratelimited_scope.labels(exc.scope, exc.limit).inc()
    if isinstance(exc, InvalidApiKey):
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json", headers=headers)


def _http_error_response(exc: web.HTTPException) -> web.Response:
    if exc.status == 405:
        err: GatewayError = MethodNotAllowed("This route does not accept that method.")
        headers = {"Allow": exc.headers.get("Allow", "")}
    elif exc.status == 404:
        err, headers = NotFound("No such route."), {}
    elif exc.status == 413:
        err, headers = BodyTooLarge("The request body is too large."), {}
    else:
        body = error_body(exc.reason or "Bad request.", "invalid_request_error")
        return web.Response(status=exc.status, body=body, content_type="application/json")
    return web.Response(status=err.status, body=err.body(), content_type="application/json", headers=headers)


def _account(state: AppState, request: web.Request, ex: Exchange) -> None:
    """Count the answer once and write the access-log line (no key, no body, ever)."""
    if not request.path.startswith("/v1/"):
        return
    elapsed = time.perf_counter() - ex.started
    model = ex.model or ""
    state.metrics.request_done(model, ex.status, ex.stream, elapsed)
    if ex.forwarded_at is not None:
        overhead = ex.forwarded_at - ex.started
        if ex.upstream_done_at is not None and not ex.stream:
            overhead += time.perf_counter() - ex.upstream_done_at
        state.metrics.overhead.observe(overhead)
    info_line("request", {
        "request_id": ex.request_id,
        "method": request.method,
        "path": request.path,
        "status": ex.status,
        "key_id": ex.key_id,
        "org": ex.org,
        "model": state.metrics.label(model) if model else None,
        "stream": ex.stream,
        "duration_ms": round(elapsed * 1000, 3),
        "upstream_ms": round((ex.upstream_done_at - ex.forwarded_at) * 1000, 3)
        if ex.upstream_done_at is not None and ex.forwarded_at is not None
        else None,
        "prompt_tokens": ex.prompt_tokens,
        "completion_tokens": ex.completion_tokens,
        "usage_source": ex.usage_source,
        "error": ex.error_code,
    })  # fmt: skip


# --- small routes ---------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    reasons = []
    if state.draining:
        reasons.append("draining")
    if state.limiter.store_down and state.settings.store_outage_policy == "fail_closed":
        reasons.append("store_unavailable")
    if not any(pool.healthy() for pool in state.pools.values()):
        reasons.append("no_healthy_upstream")
    if reasons:
        return _json(503, {"status": "unavailable", "reasons": reasons})
    if state.store_ok:
        store = "up"
    elif state.limiter.store_down:
        store = "degraded (fail_open)"
    else:  # some Cluster primaries answer: the keys on their slots are served
        store = f"partial ({state.store_primaries[0]} of {state.store_primaries[1]} primaries answer)"
    return _json(200, {"status": "ready", "store": store})


async def metrics_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.usage_pending.set(state.usage.pending)
    state.metrics.draining.set(1 if state.draining else 0)
    now = state.clock()
    for name, pool in state.pools.items():
        for upstream in pool.upstreams:
            state.metrics.upstream_healthy.labels(name, upstream.root).set(1 if upstream.available(now) else 0)
    export_load_sources(state.metrics, state.pools, now)
    return web.Response(body=state.metrics.exposition(), content_type="text/plain", charset="utf-8")


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    record = await state.auth.authenticate(request.headers.get("Authorization"))
    request[EXCHANGE].key_id = record.key_id
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": "liutong"}
        for model in state.pools
        if record.allows_model(model)
    ]
    return _json(200, {"object": "list", "data": data})


# --- lifecycle ------------------------------------------------------------------------------


async def _monitor_store(state: AppState, interval: float = 0.25) -> None:
    """Keep `store_ok` (and `/readyz`) within a second of the store's real state.

    On a Cluster every primary is pinged: `store_ok` (`liutong_store_up`) needs them all, since
    the keys of a silent primary's slots cannot be served. Readiness under fail_closed, and the
    limiter's fast-fail, need only one: while some primaries answer, the keys on their slots are
    served, and every replica turning unready at once would refuse those too.
    """
    while True:
        answered, asked = await ping_primaries(state.store.redis, state.settings.store_timeout)
        ok = answered == asked
        if ok != state.store_ok:
            log.warning("store_state_changed", up=ok, primaries_answering=answered, primaries=asked)
        state.store_ok = ok
        state.store_primaries = (answered, asked)
        state.limiter.store_down = answered == 0
        if ok:
            state.limiter.set_degraded(False)
        state.metrics.store_up.set(1 if ok else 0)
        await asyncio.sleep(interval)


def _lifecycle(state: AppState) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300)
        state.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, read_bufsize=2**16, skip_auto_headers=("User-Agent",)
        )
        if state.store.embedded:
            log.warning(
                "embedded_store",
                message="No redis_url configured: keys, limits and usage live in this process only, "
                "are not shared with other replicas and are lost on restart.",
            )
        try:
            await state.store.load_scripts()
        except Exception as exc:  # the store may come up later; EVALSHA reloads them then
            log.warning("store_unreachable_at_start", error=type(exc).__name__)
        state.usage.start()
        monitor = asyncio.get_running_loop().create_task(_monitor_store(state), name="store-monitor")
        checks = asyncio.get_running_loop().create_task(
            run_health_checks(lambda: state.pools, state.session), name="upstream-health-checks"
        )
        load_polls = asyncio.get_running_loop().create_task(
            run_load_polls(lambda: state.pools, state.session), name="upstream-load-polls"
        )
        # Key and org changes made on other replicas (or by the CLI) drop this one's cache entries.
        subscriber = None if state.store.embedded or not state.settings.redis_url else Subscriber(
            state.settings.redis_url, state.events, connect_timeout=max(state.settings.store_timeout, 1.0)
        )  # fmt: skip
        if subscriber is not None:
            await subscriber.start()
        try:
            yield
        finally:
            monitor.cancel()
            checks.cancel()
            load_polls.cancel()
            if subscriber is not None:
                await subscriber.close()
            await state.usage.close()
            await state.upstream_http.close()
            await state.session.close()
            await state.store.close()

    return lifecycle


def build_state(settings: Settings, *, store: Store | None = None, clock: Callable[[], float] | None = None) -> AppState:
    clock = clock or time.monotonic
    store = store or open_store(
        settings.redis_url, timeout=settings.store_timeout, max_connections=settings.store_max_connections
    )
    metrics = Metrics(settings.models)
    events = Events(store.redis)
    keys = KeyService(store.redis, events)

    def degraded_changed(degraded: bool) -> None:
        metrics.store_degraded.set(1 if degraded else 0)
        if degraded:
            log.error("store_outage_fail_open", share=settings.fail_open_share,
                      message="Serving with per-replica local limits until the store answers again.")  # fmt: skip
        else:
            log.warning("store_recovered", message="Limits are shared through the store again.")

    def tokens_written(record: UsageRecord) -> None:
        model = metrics.label(record.model)
        metrics.child(metrics.tokens, model, "prompt").inc(record.prompt_tokens)
        metrics.child(metrics.tokens, model, "completion").inc(record.completion_tokens)

    state = AppState(
        settings=settings,
        store=store,
        keys=keys,
        auth=Authenticator(keys, clock, ttl=settings.key_cache_ttl, stale_ttl=settings.key_cache_stale_ttl),
        limiter=Limiter(
            store,
            lease_seconds=settings.concurrency_lease_seconds,
            fail_open_share=settings.fail_open_share if settings.store_outage_policy == "fail_open" else None,
            clock=clock,
            on_degraded=degraded_changed,
            overlap=settings.admission_overlap,
        ),
        usage=UsageWriter(
            store,
            # The embedded store never becomes unreachable (and keeps nothing across restarts).
            spool=open_spool(None if store.embedded else settings.usage_spool_path, fsync=settings.usage_spool_fsync,
                             fsync_interval=settings.usage_spool_fsync_interval),
            stream_maxlen=settings.usage_stream_maxlen,
            on_written=tokens_written,
            on_pending=metrics.usage_pending.set,
        ),
        metrics=metrics,
        pools=build_pools(settings.models, clock),
        clock=clock,
        events=events,
    )
    events.listen(state.forget)
    return state


def create_app(settings: Settings, *, store: Store | None = None, clock: Callable[[], float] | None = None) -> web.Application:
    state = build_state(settings, store=store, clock=clock)
    app = web.Application(middlewares=[exchange_middleware], client_max_size=settings.max_body_bytes)
    app[STATE] = state
    app.cleanup_ctx.append(_lifecycle(state))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi_handler)
    if settings.admin_listen is None:
        app.router.add_get("/metrics", metrics_handler)
        setup_admin(app, state)
    return app


def create_admin_app(main: web.Application) -> web.Application:
    """The admin listener's app: `/metrics` and `/admin/`, plus the health routes."""
    admin = web.Application(middlewares=[exchange_middleware])
    admin[STATE] = main[STATE]
    admin.router.add_get("/metrics", metrics_handler)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    setup_admin(admin, main[STATE])
    return admin
