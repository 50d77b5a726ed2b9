"""Token-bucket limits on requests, tokens and concurrency, shared through the store.

`Limiter.acquire` admits a request with one EVALSHA of `acquire.lua`: the key's rpm and tpm
buckets (and its org's, when the org has limits) are all checked before any is debited, and a
concurrency lease is taken in the same step. The tpm buckets are debited an estimate; `finish`
(run in the usage writer's pipeline, see `usage/writer.py`) refunds or charges the difference to the
real usage and releases the lease. Capacity is the per-minute figure, refilled continuously.
The `x-ratelimit-*` headers report the tighter of the key's and the org's buckets.

Overlapped admission: while the store's last answer for a plan (under a second old) leaves
room for this request, for every request this replica has asked about since and for a margin,
`overlappable` says so and the proxy sends the request upstream while the acquire is in flight,
then waits for the verdict before the client sees a byte. The store still decides every request
exactly: a denial that arrives after forwarding drops the upstream response and answers 429.
With one replica that cannot happen (only its own requests spend the buckets), and the margin
makes it rare with several. Near a limit every request waits for the store first.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import hiredis
from redis.exceptions import RedisError

from gateway.config import Limits
from gateway.errors import RateLimited, StoreUnavailable
from gateway.keys.records import KeyRecord
from gateway.store import names
from gateway.store.client import Store

# Overlapped admission (see the module doc): the store's last answer must be this recent, and
# leave this share of every limit free after the request.
OVERLAP_FRESH_SECONDS = 1.0
OVERLAP_MARGIN = 0.1


@dataclass(frozen=True, slots=True)
class OrgLimits:
    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True, slots=True)
class Bucket:
    redis_key: str
    kind: str  # "requests" or "tokens"
    scope: str  # "key" or "org"
    capacity: int


@dataclass(frozen=True, slots=True)
class Plan:
    """The buckets and the concurrency limit that apply to one key (built once per key and
    reused while its record and limits stay the same: see `AppState.plan_for`)."""

    buckets: tuple[Bucket, ...]
    concurrency_key: str
    max_concurrent: int
    keys: tuple[str, ...] = field(init=False)  # the scripts' KEYS: the buckets, then the lease set
    tokens_capacity: int | None = field(init=False)  # the smallest tokens bucket, if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", (*(b.redis_key for b in self.buckets), self.concurrency_key))
        caps = [b.capacity for b in self.buckets if b.kind == "tokens"]
        object.__setattr__(self, "tokens_capacity", min(caps) if caps else None)

    def scaled(self, share: float) -> Plan:
        """This plan with every limit cut to `share` of itself (the fail_open per-replica budget)."""
        buckets = tuple(replace(b, capacity=max(1, int(b.capacity * share))) for b in self.buckets)
        conc = max(1, int(self.max_concurrent * share)) if self.max_concurrent else 0
        return Plan(buckets, self.concurrency_key, conc)


@dataclass(frozen=True, slots=True)
class Grant:
    """An admitted request: what was reserved, and the headers to send."""

    plan: Plan
    member: str
    reserved_tokens: int
    headers: dict[str, str]
    local: bool = False  # admitted by this replica's own buckets while the store was down


def plan_for(record: KeyRecord, defaults: Limits, org: OrgLimits | None) -> Plan:
    rpm = defaults.rpm if record.rpm is None else record.rpm
    tpm = defaults.tpm if record.tpm is None else record.tpm
    conc = defaults.max_concurrent if record.max_concurrent is None else record.max_concurrent
    tag = names.limit_tag(record.key_id, record.org)
    buckets = []
    if rpm:
        buckets.append(Bucket(names.key_bucket(tag, record.key_id, "rpm"), "requests", "key", rpm))
    if tpm:
        buckets.append(Bucket(names.key_bucket(tag, record.key_id, "tpm"), "tokens", "key", tpm))
    if org and record.org:
        if org.rpm:
            buckets.append(Bucket(names.org_bucket(tag, record.org, "rpm"), "requests", "org", org.rpm))
        if org.tpm:
            buckets.append(Bucket(names.org_bucket(tag, record.org, "tpm"), "tokens", "org", org.tpm))
    return Plan(tuple(buckets), names.concurrency_set(tag, record.key_id), conc)


def format_duration(ms: int) -> str:
    """OpenAI's reset format: `120ms`, `1s`, `6m0s`, `1h2m3s`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _headers(plan: Plan, reply: list[int]) -> dict[str, str]:
    headers: dict[str, str] = {}
    chosen: dict[str, tuple[int, int, int]] = {}
    for i, bucket in enumerate(plan.buckets):
        level, reset_ms = int(reply[4 + 2 * i]), int(reply[5 + 2 * i])
        best = chosen.get(bucket.kind)
        if best is None or level < best[1]:
            chosen[bucket.kind] = (bucket.capacity, level, reset_ms)
    for kind, (capacity, level, reset_ms) in chosen.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(capacity)
        headers[f"x-ratelimit-remaining-{kind}"] = str(level)
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(reset_ms)
    return headers


class _Seen:
    """The store's last answer about one plan, and what this replica has asked since."""

    __slots__ = ("plan", "reply", "levels", "in_flight", "at", "asked", "asked_tokens")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.reply: list[int] = []
        self.levels: list[int] = []
        self.in_flight = 0
        self.at = -1e9  # monotonic seconds of the answer; never answered yet
        self.asked = 0  # acquires sent and not yet answered
        self.asked_tokens = 0

    def ask(self, tokens: int) -> None:
        self.asked += 1
        self.asked_tokens += tokens

    def unask(self, tokens: int) -> None:
        self.asked -= 1
        self.asked_tokens -= tokens

    def provisional(self, member: str, tokens: int) -> Grant:
        """The grant of an overlapped request that the store could not decide: it was forwarded
        on the last answer, whose figures its headers carry (none if the plan is newer)."""
        return Grant(self.plan, member, tokens, _headers(self.plan, self.reply) if self.reply else {})

    def answered(self, reply: list[int]) -> None:
        self.reply = reply
        self.in_flight = int(reply[3])
        self.levels = [int(level) for level in reply[4::2]]
        self.at = time.monotonic()


def _copy_outcome(outcome: asyncio.Future[Grant], done: asyncio.Future[Grant]) -> None:
    if done.cancelled():
        outcome.cancel()
    elif done.exception() is not None:
        outcome.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        outcome.set_result(done.result())


class LocalBuckets:
    """The same buckets as `acquire.lua`, in this process only: the fail_open fallback."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._levels: dict[str, tuple[float, float]] = {}
        self._inflight: dict[str, set[str]] = {}

    def _level(self, bucket: Bucket, now_ms: float) -> float:
        level, ts = self._levels.get(bucket.redis_key, (bucket.capacity, now_ms))
        return min(bucket.capacity, level + max(0.0, now_ms - ts) * bucket.capacity / 60000)

    def acquire(self, plan: Plan, member: str, tokens: int) -> list[int]:
        """A reply shaped like `acquire.lua`'s."""
        now = self._clock() * 1000
        verdict, culprit, retry_ms = 1, 0, 0
        levels = []
        for i, bucket in enumerate(plan.buckets, start=1):
            level = self._level(bucket, now)
            cost = 1 if bucket.kind == "requests" else tokens
            levels.append(level)
            if cost > bucket.capacity:
                if verdict != 2:
                    verdict, culprit, retry_ms = 2, i, 0
            elif level < cost and verdict != 2:
                wait = math.ceil((cost - level) * 60000 / bucket.capacity)
                if verdict == 1 or wait > retry_ms:
                    verdict, culprit, retry_ms = 0, i, wait
        holders = self._inflight.setdefault(plan.concurrency_key, set())
        if verdict == 1 and plan.max_concurrent and len(holders) >= plan.max_concurrent:
            verdict, culprit, retry_ms = 0, len(plan.buckets) + 1, 1000
        if verdict == 1:
            for i, bucket in enumerate(plan.buckets):
                levels[i] -= 1 if bucket.kind == "requests" else tokens
                self._levels[bucket.redis_key] = (levels[i], now)
            holders.add(member)
        reply = [verdict, culprit, retry_ms, len(holders)]
        for bucket, level in zip(plan.buckets, levels, strict=True):
            reply += [math.floor(max(0, level)), math.ceil(max(0, bucket.capacity - level) * 60000 / bucket.capacity)]
        return reply

    def finish(self, grant: Grant, used_tokens: int) -> None:
        holders = self._inflight.get(grant.plan.concurrency_key)
        if not holders or grant.member not in holders:
            return
        holders.discard(grant.member)
        now = self._clock() * 1000
        for bucket in grant.plan.buckets:
            if bucket.kind == "tokens":
                level = self._level(bucket, now) + grant.reserved_tokens - used_tokens
                self._levels[bucket.redis_key] = (min(bucket.capacity, level), now)


class Limiter:
    """Admits requests against the shared store; under `fail_open`, against local buckets
    sized `fail_open_share` of each limit while the store is unreachable."""

    def __init__(
        self,
        store: Store,
        *,
        lease_seconds: float,
        fail_open_share: float | None = None,
        clock: Callable[[], float] | None = None,
        on_degraded: Callable[[bool], None] | None = None,
        overlap: bool = True,
    ) -> None:
        self._store = store
        self._lease_ms = int(lease_seconds * 1000)
        self._share = fail_open_share
        self._local = LocalBuckets(clock) if fail_open_share and clock else None
        self._on_degraded = on_degraded
        self.degraded = False
        # Set by the store monitor: while the store is known to be down, don't wait on it.
        self.store_down = False
        self.overlap = overlap
        self._seen: dict[str, _Seen] = {}

    def overlappable(self, plan: Plan, tokens: int) -> bool:
        """Whether this request may go upstream before the store's verdict (see the module doc)."""
        seen = self._seen.get(plan.concurrency_key)
        if (
            seen is None
            or (seen.plan is not plan and seen.plan != plan)
            or not self.overlap
            or self.store_down
            or self.degraded
            or time.monotonic() - seen.at > OVERLAP_FRESH_SECONDS
        ):
            return False
        for bucket, level in zip(plan.buckets, seen.levels, strict=True):
            if bucket.kind == "requests":
                left = level - seen.asked - 1
            else:
                left = level - seen.asked_tokens - tokens
            if left < bucket.capacity * OVERLAP_MARGIN:
                return False
        conc = plan.max_concurrent
        return not conc or seen.in_flight + seen.asked + 1 <= conc * (1 - OVERLAP_MARGIN)

    def reservation(self, plan: Plan, estimate: int, explicit_max: bool) -> int:
        """Tokens to reserve. An estimate that only exceeds the bucket because of the default
        completion allowance is capped to the capacity; an explicit `max_tokens` is not."""
        capacity = plan.tokens_capacity
        if capacity is not None and not explicit_max:
            return min(estimate, capacity)
        return estimate

    async def acquire(self, plan: Plan, member: str, tokens: int, overlapped: bool = False) -> Grant:
        """Admit one request or raise `RateLimited` (or `StoreUnavailable`). An `overlapped`
        request, already sent upstream, is admitted on the store's last answer if the store
        cannot be reached now (and is settled when it can): what an upstream saw is recorded."""
        seen = self._seen_for(plan)
        try:
            if self.store_down:
                raise ConnectionError("the store monitor saw the store down")
            seen.ask(tokens)
            try:
                reply = await self._store.run(self._store.scripts.acquire, plan.keys, self._args(plan, member, tokens))
            finally:
                seen.unask(tokens)
        except (RedisError, OSError):
            seen.at = -1e9  # no more overlapping on this answer
            if overlapped:
                return seen.provisional(member, tokens)
            if self._local is None or self._share is None:
                raise StoreUnavailable("The limit store is unreachable; try again shortly.") from None
            self.set_degraded(True)
            plan = plan.scaled(self._share)
            return self._verdict(plan, member, tokens, self._local.acquire(plan, member, tokens), local=True)
        seen.answered(reply)
        self.set_degraded(False)
        return self._verdict(plan, member, tokens, reply)

    def admit_overlapped(self, plan: Plan, member: str, tokens: int) -> asyncio.Future[Grant]:
        """`acquire(overlapped=True)` as a future, sent at once on the lean client's connection
        (a callback, no task, in the steady state; the coroutine in a task otherwise)."""
        sent = self._store.run_now(self._store.scripts.acquire, plan.keys, self._args(plan, member, tokens))
        if sent is None:
            return asyncio.ensure_future(self.acquire(plan, member, tokens, overlapped=True))
        seen = self._seen_for(plan)
        seen.ask(tokens)
        outcome: asyncio.Future[Grant] = sent.get_loop().create_future()

        def answered(reply_future: asyncio.Future[Any]) -> None:
            seen.unask(tokens)
            failure = ConnectionError("cancelled") if reply_future.cancelled() else reply_future.exception()
            reply: Any = None if failure is not None else reply_future.result()
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                again = asyncio.ensure_future(self.acquire(plan, member, tokens, overlapped=True))
                again.add_done_callback(functools.partial(_copy_outcome, outcome))
                return
            if failure is not None or isinstance(reply, hiredis.ReplyError):
                seen.at = -1e9
                outcome.set_result(seen.provisional(member, tokens))
                return
            seen.answered(reply)
            self.set_degraded(False)
            try:
                outcome.set_result(self._verdict(plan, member, tokens, reply))
            except RateLimited as exc:
                outcome.set_exception(exc)

        sent.add_done_callback(answered)
        return outcome

    def _seen_for(self, plan: Plan) -> _Seen:
        seen = self._seen.get(plan.concurrency_key)
        if seen is not None and seen.plan is not plan:
            if seen.plan == plan:
                seen.plan = plan
            else:  # its limits changed: what the store said about the old ones does not apply
                seen = None
        if seen is None:
            if len(self._seen) >= 100_000:  # keys come and go; forget them all now and then
                self._seen.clear()
            seen = self._seen[plan.concurrency_key] = _Seen(plan)
        return seen

    def _args(self, plan: Plan, member: str, tokens: int) -> list[int | str]:
        args: list[int | str] = [len(plan.buckets), member, plan.max_concurrent, self._lease_ms]
        for bucket in plan.buckets:
            args += [bucket.capacity, 1 if bucket.kind == "requests" else tokens]
        return args

    def _verdict(self, plan: Plan, member: str, tokens: int, reply: list[int], local: bool = False) -> Grant:
        """The grant of an admitting reply (shaped like `acquire.lua`'s); `RateLimited` else."""
        verdict, culprit, retry_ms = int(reply[0]), int(reply[1]), int(reply[2])
        headers = _headers(plan, reply)
        if verdict == 1:
            return Grant(plan, member, tokens, headers, local)
        if culprit == len(plan.buckets) + 1:
            limit, scope = "concurrency", "key"
            message = f"Concurrency limit of this key reached ({plan.max_concurrent} requests in flight)."
        else:
            bucket = plan.buckets[culprit - 1]
            limit, scope = bucket.kind, bucket.scope
            per = "requests" if limit == "requests" else "tokens"
            message = f"Rate limit reached for {per} per minute of this {scope} (limit {bucket.capacity})."
        if verdict == 2:
            message = (
                f"This request needs about {tokens} tokens, more than the {scope}'s limit of "
                f"{plan.buckets[culprit - 1].capacity} tokens per minute; it can never be served."
            )
            headers["x-should-retry"] = "false"
            retry_ms = 60_000
        else:
            retry_ms = max(retry_ms, 1)
        headers["retry-after"] = str(max(1, math.ceil(retry_ms / 1000)))
        headers["retry-after-ms"] = str(retry_ms)
        raise RateLimited(message, limit=limit, scope=scope, headers=headers)

    def set_degraded(self, degraded: bool) -> None:
        if degraded != self.degraded:
            self.degraded = degraded
            if self._on_degraded is not None:
                self._on_degraded(degraded)

    def finish_call(self, grant: Grant, used_tokens: int) -> tuple[list[str], list[int | str]]:
        """Keys and arguments of `finish.lua` for this grant (run in a pipeline by the writer).
        A locally admitted grant is settled here at once; its `finish.lua` call is a no-op."""
        if grant.local and self._local is not None:
            self._local.finish(grant, used_tokens)
        keys = list(grant.plan.keys)
        args: list[int | str] = [len(grant.plan.buckets), grant.member]
        for bucket in grant.plan.buckets:
            delta = grant.reserved_tokens - used_tokens if bucket.kind == "tokens" else 0
            args += [bucket.capacity, delta]
        return keys, args
