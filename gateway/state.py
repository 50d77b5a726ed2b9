"""The app's services (`AppState`, under `STATE`) and each request's record (`Exchange`).

`AppState` is built once by `create_app` and holds every service a handler needs; nothing
lives in module globals. `Exchange` collects what one request's access-log line, metrics and
usage record need as the handler learns it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config import Settings
from gateway.errors import StoreUnavailable
from gateway.keys.auth import Authenticator
from gateway.keys.events import Event, Events
from gateway.keys.records import KeyRecord, KeyService
from gateway.limits.buckets import Limiter, OrgLimits, Plan, plan_for
from gateway.metrics import Metrics
from gateway.store.client import Store
from gateway.store.names import org_record
from gateway.upstream.client import UpstreamClient
from gateway.upstream.pool import Pool, build_pools
from gateway.usage.writer import UsageWriter


@dataclass(eq=False)
class AppState:
    settings: Settings
    store: Store
    keys: KeyService
    auth: Authenticator
    limiter: Limiter
    usage: UsageWriter
    metrics: Metrics
    pools: dict[str, Pool]
    clock: Callable[[], float]
    events: Events  # key and org changes: published by the services, heard from other replicas
    session: aiohttp.ClientSession = field(init=False)  # health checks
    upstream_http: UpstreamClient = field(default_factory=UpstreamClient)  # chat requests
    draining: bool = False
    # The drain's grace period is over: streams still open are ended with an error event.
    drain_expired: bool = False
    # Upstream responses of the streams being relayed, so that the drain can end them (`close`).
    streams: set[Any] = field(default_factory=set)
    store_ok: bool = True  # every primary answers the store monitor's ping
    store_primaries: tuple[int, int] = (1, 1)  # primaries answering, primaries asked
    inflight: int = 0
    _orgs: dict[str, tuple[float, OrgLimits | None]] = field(default_factory=dict)
    _org_reads: dict[str, asyncio.Task[OrgLimits | None]] = field(default_factory=dict)  # one read per org
    _plans: dict[str, tuple[KeyRecord, OrgLimits | None, Any, Plan]] = field(default_factory=dict)

    def apply_settings(self, settings: Settings) -> None:
        """A reloaded config: new requests see the new models, upstreams, timeouts and limits;
        requests in flight finish on the pool they started with."""
        self.settings = settings
        self.pools = build_pools(settings.models, self.clock, self.pools)
        self.metrics.set_models(settings.models)

    async def plan_for(self, record: KeyRecord) -> Plan:
        """The buckets for this key: its own limits, and its org's when the org has some. The
        plan is rebuilt only when the key's record, its org's limits or the defaults change."""
        org = await self._org_limits(record.org) if record.org else None
        defaults = self.settings.limits
        cached = self._plans.get(record.key_id)
        if cached is not None and cached[0] is record and cached[1] is org and cached[2] is defaults:
            return cached[3]
        plan = plan_for(record, defaults, org)
        if cached is not None and cached[3] == plan:
            plan = cached[3]  # the same limits (a refreshed record): keep the object the limiter knows
        if len(self._plans) >= 100_000:
            self._plans.clear()
        self._plans[record.key_id] = (record, org, defaults, plan)
        return plan

    def forget(self, event: Event) -> None:
        """A key or an org changed (here or on another replica): drop its cached entry."""
        if event.kind == "key":
            self.auth.forget(event.id)
        elif event.kind == "org":
            self._orgs.pop(event.id, None)
            self._org_reads.pop(event.id, None)  # a read in flight may predate the change: not cached

    async def _org_limits(self, org: str | None) -> OrgLimits | None:
        if not org:
            return None
        cached = self._orgs.get(org)
        if cached is not None and self.clock() - cached[0] < self.settings.key_cache_ttl:
            return cached[1]
        # Concurrent misses share one read, so that a burst on a cold org is one store round trip.
        read = self._org_reads.get(org)
        if read is None:
            read = asyncio.get_running_loop().create_task(self._read_org(org))
            self._org_reads[org] = read
            read.add_done_callback(lambda done: self._org_read_done(org, done))
        try:
            return await asyncio.shield(read)
        except asyncio.CancelledError:
            raise
        except Exception:
            if cached is not None:
                return cached[1]
            if self.settings.store_outage_policy == "fail_closed":  # never skip an org's limits silently
                raise StoreUnavailable("The limit store is unreachable; try again shortly.") from None
            return None

    async def _read_org(self, org: str) -> OrgLimits | None:
        now = self.clock()
        raw = await self.store.redis.hgetall(org_record(org))
        limits = OrgLimits(rpm=int(raw.get(b"rpm") or 0), tpm=int(raw.get(b"tpm") or 0)) if raw else None
        if self._org_reads.get(org) is asyncio.current_task():  # not invalidated meanwhile
            self._orgs[org] = (now, limits)
        return limits

    def _org_read_done(self, org: str, read: asyncio.Task[OrgLimits | None]) -> None:
        if self._org_reads.get(org) is read:
            del self._org_reads[org]
        if not read.cancelled():
            read.exception()  # retrieved here: every waiter may have gone


STATE = web.AppKey("state", AppState)


class Exchange:
    """One request as the access log, the metrics and the usage record see it."""

    __slots__ = (
        "request_id", "started", "started_wall", "key_id", "org", "model", "stream", "status",
        "limited", "ratelimit_headers", "forwarded_at", "upstream_done_at", "response",
        "prompt_tokens", "completion_tokens", "usage_source", "error_code",
    )  # fmt: skip

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.key_id: str | None = None
        self.org: str | None = None
        self.model: str | None = None
        self.stream = False
        self.status = 0
        self.limited = False
        self.ratelimit_headers: dict[str, str] = {}
        self.forwarded_at: float | None = None
        self.upstream_done_at: float | None = None
        self.response: Any = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.usage_source: str | None = None
        self.error_code: str | None = None


EXCHANGE = web.RequestKey("exchange", Exchange)
