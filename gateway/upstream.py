"""Upstream pools: which model server gets the next request, and which are out of rotation.

Each configured model has a pool of upstream roots, taken in round-robin order. Passive
outlier ejection (Envoy's defaults): after 5 consecutive failures (refused, reset, timed out
or 5xx) an upstream leaves the rotation for 30 s, then gets one request as a probe; a success
brings it back. When every upstream is ejected the pool still offers the one whose ejection
ends first, so that a fully failed pool recovers without an operator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.config import ModelRoute

EJECT_AFTER_FAILURES = 5
EJECT_SECONDS = 30.0


@dataclass(slots=True)
class Upstream:
    root: str
    url: str  # root + /v1/chat/completions
    failures: int = 0
    ejected_until: float = 0.0

    def available(self, now: float) -> bool:
        return self.ejected_until <= now


class Pool:
    def __init__(self, route: ModelRoute, clock: Callable[[], float]) -> None:
        self.route = route
        self.upstreams = [Upstream(root, root + "/v1/chat/completions") for root in route.upstreams]
        self._clock = clock
        self._next = 0

    def pick(self) -> Upstream:
        now = self._clock()
        count = len(self.upstreams)
        for step in range(count):
            upstream = self.upstreams[(self._next + step) % count]
            if upstream.available(now):
                self._next = (self._next + step + 1) % count
                return upstream
        return min(self.upstreams, key=lambda u: u.ejected_until)

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


def build_pools(models: Mapping[str, ModelRoute], clock: Callable[[], float]) -> dict[str, Pool]:
    return {name: Pool(route, clock) for name, route in models.items()}
