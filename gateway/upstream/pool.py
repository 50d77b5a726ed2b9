"""Upstream pools: which model server gets the next request, and which are out of rotation.

The model's routing policy (`policies.py`: `prefix_affinity` by default, `least_outstanding`,
`round_robin`) chooses among the upstreams in rotation, below their connection limit and not
yet tried by the request. An upstream leaves the rotation when
- passive outlier ejection (Envoy's defaults) sees 5 consecutive failures (refused, reset,
  timed out or 5xx): out for 30 s, then it gets requests again as a probe, and one success
  brings it fully back;
- active health checks (optional, per model) fail `unhealthy_after` times in a row; it
  returns after `healthy_after` good checks;
- it has `max_connections` requests in flight (it is skipped, not ejected).
When every upstream is out, the pool still offers the one whose ejection ends first, so that a
fully failed pool recovers without an operator; when every one is at its connection limit the
request is refused (503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import structlog

from gateway.config import ModelRoute
from gateway.errors import NoHealthyUpstream
from gateway.upstream.client import Target
from gateway.upstream.load import LoadSample
from gateway.upstream.policies import Policy, PrefixAffinity, make_policy, upstream_seed
from gateway.upstream.prefix_index import PrefixIndex, PromptBlocks, prompt_blocks

EJECT_AFTER_FAILURES = 5
EJECT_SECONDS = 30.0

log = structlog.get_logger("liutong.upstream")


@dataclass(slots=True, eq=False)
class Upstream:
    root: str
    target: Target  # root + /v1/chat/completions
    weight: int = 1
    max_connections: int = 0  # 0: no limit
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    checks_failed: int = 0
    checks_passed: int = 0
    check_healthy: bool = True  # the active health check's verdict
    seed: int = 0  # rendezvous hashing seed of `root`
    rr_current: int = 0  # smooth weighted round robin's running weight
    load: LoadSample | None = None  # the server's own load, last scraped (`load.py`)
    load_logged_at: float = -1e18  # the last scrape failure logged

    def available(self, now: float) -> bool:
        return self.check_healthy and self.ejected_until <= now

    def full(self) -> bool:
        return bool(self.max_connections) and self.outstanding >= self.max_connections


class Pool:
    def __init__(self, route: ModelRoute, clock: Callable[[], float], previous: Pool | None = None) -> None:
        self.route = route
        weights = route.weights or (1,) * len(route.upstreams)
        limits = route.max_connections or (0,) * len(route.upstreams)
        self.upstreams = [
            Upstream(root, Target(root + "/v1/chat/completions"), weight, limit, seed=upstream_seed(root))
            for root, weight, limit in zip(route.upstreams, weights, limits, strict=True)
        ]
        self._clock = clock
        self._next = 0
        # What each upstream was sent survives a reload (SIGHUP) for the upstreams that stay.
        kept = previous.indexes if previous is not None else {}
        capacity = route.prefix_affinity.index_blocks
        self.indexes: dict[str, PrefixIndex] = {}
        for root in route.upstreams:
            index = kept.get(root)
            if index is None:
                index = PrefixIndex(capacity)
            index.resize(capacity)
            self.indexes[root] = index
        self.policy: Policy = make_policy(route, self.indexes)

    def clock(self) -> float:
        return self._clock()

    def prompt_of(self, messages: object) -> PromptBlocks | None:
        """The request's prompt blocks when the policy routes on them (None otherwise: no work,
        e.g. for a model with one upstream)."""
        if len(self.upstreams) < 2 or not isinstance(self.policy, PrefixAffinity) or not isinstance(messages, list):
            return None
        return prompt_blocks(messages, self.route.prefix_affinity.max_blocks)

    def pick(self, avoid: list[Upstream] | tuple[Upstream, ...] = (), prompt: PromptBlocks | None = None) -> Upstream:
        """The next upstream for a request, skipping ejected and full ones and those in `avoid`."""
        now = self._clock()
        count = len(self.upstreams)
        candidates = []
        for step in range(count):
            upstream = self.upstreams[(self._next + step) % count]
            if upstream in avoid or not upstream.available(now) or upstream.full():
                continue
            candidates.append(upstream)
        if candidates:
            best = self.policy.choose(self, candidates, prompt, now)
        else:
            fallback = [u for u in self.upstreams if u not in avoid and not u.full()]
            if not fallback:
                raise NoHealthyUpstream(f"Every upstream of {self.route.name} is at its connection limit.")
            best = min(fallback, key=lambda u: u.ejected_until)
        self._next = (self.upstreams.index(best) + 1) % count
        best.served += 1
        self.policy.sent(best, prompt)
        return best

    def healthy(self) -> bool:
        now = self._clock()
        return any(u.available(now) for u in self.upstreams)

    def succeeded(self, upstream: Upstream) -> None:
        upstream.failures = 0
        upstream.ejected_until = 0.0

    def failed(self, upstream: Upstream) -> None:
        upstream.failures += 1
        if upstream.failures >= EJECT_AFTER_FAILURES:
            upstream.ejected_until = self._clock() + EJECT_SECONDS

    def checked(self, upstream: Upstream, ok: bool) -> None:
        """Record an active health check's outcome."""
        check = self.route.health_check
        if check is None:
            return
        if ok:
            upstream.checks_passed += 1
            upstream.checks_failed = 0
            if not upstream.check_healthy and upstream.checks_passed >= check.healthy_after:
                upstream.check_healthy = True
                log.warning("upstream_healthy", model=self.route.name, upstream=upstream.root)
        else:
            upstream.checks_failed += 1
            upstream.checks_passed = 0
            if upstream.check_healthy and upstream.checks_failed >= check.unhealthy_after:
                upstream.check_healthy = False
                log.error("upstream_unhealthy", model=self.route.name, upstream=upstream.root)


def build_pools(
    models: Mapping[str, ModelRoute], clock: Callable[[], float], previous: Mapping[str, Pool] | None = None
) -> dict[str, Pool]:
    """A pool per model; `previous` (the pools before a reload) lends its prefix indexes."""
    previous = previous or {}
    return {name: Pool(route, clock, previous.get(name)) for name, route in models.items()}


async def run_health_checks(pools: Callable[[], Mapping[str, Pool]], session: aiohttp.ClientSession) -> None:
    """Check every upstream of every pool that has a `health_check`, each on its own interval."""
    due: dict[int, float] = {}
    loop = asyncio.get_running_loop()
    while True:
        now = loop.time()
        checks = []
        for pool in pools().values():
            check = pool.route.health_check
            if check is None:
                continue
            for upstream in pool.upstreams:
                if due.get(id(upstream), 0.0) <= now:
                    due[id(upstream)] = now + check.interval
                    checks.append(_check(pool, upstream, session))
        if checks:
            await asyncio.gather(*checks)
        await asyncio.sleep(0.25)


async def _check(pool: Pool, upstream: Upstream, session: aiohttp.ClientSession) -> None:
    check = pool.route.health_check
    assert check is not None  # type narrowing: only pools with a health_check are checked
    try:
        timeout = aiohttp.ClientTimeout(total=check.timeout)
        async with session.get(upstream.root + check.path, timeout=timeout, allow_redirects=False) as resp:
            ok = 200 <= resp.status < 300
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    pool.checked(upstream, ok)
