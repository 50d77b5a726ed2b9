"""Upstream pools: which model server gets the next request, and which are out of rotation.

Balancing is weighted least-outstanding-requests: the upstream with the fewest requests in
flight per unit of weight wins; ties go to the one that has served the fewest requests per unit
of weight, so that idle traffic is spread in proportion to the weights. An upstream leaves the rotation when
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

    def available(self, now: float) -> bool:
        return self.check_healthy and self.ejected_until <= now

    def full(self) -> bool:
        return bool(self.max_connections) and self.outstanding >= self.max_connections


class Pool:
    def __init__(self, route: ModelRoute, clock: Callable[[], float]) -> None:
        self.route = route
        weights = route.weights or (1,) * len(route.upstreams)
        limits = route.max_connections or (0,) * len(route.upstreams)
        self.upstreams = [
            Upstream(root, Target(root + "/v1/chat/completions"), weight, limit)
            for root, weight, limit in zip(route.upstreams, weights, limits, strict=True)
        ]
        self._clock = clock
        self._next = 0

    def pick(self, avoid: list[Upstream] | tuple[Upstream, ...] = ()) -> Upstream:
        """The next upstream for a request, skipping ejected and full ones and those in `avoid`."""
        now = self._clock()
        count = len(self.upstreams)
        best: Upstream | None = None
        best_load = (0.0, 0.0)
        for step in range(count):
            upstream = self.upstreams[(self._next + step) % count]
            if upstream in avoid or not upstream.available(now) or upstream.full():
                continue
            load = (upstream.outstanding / upstream.weight, upstream.served / upstream.weight)
            if best is None or load < best_load:
                best, best_load = upstream, load
        if best is None:
            candidates = [u for u in self.upstreams if u not in avoid and not u.full()]
            if not candidates:
                raise NoHealthyUpstream(f"Every upstream of {self.route.name} is at its connection limit.")
            best = min(candidates, key=lambda u: u.ejected_until)
        self._next = (self.upstreams.index(best) + 1) % count
        best.served += 1
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


def build_pools(models: Mapping[str, ModelRoute], clock: Callable[[], float]) -> dict[str, Pool]:
    return {name: Pool(route, clock) for name, route in models.items()}


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
