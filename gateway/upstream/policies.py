"""Routing policies (`models.<id>.routing`): which of a pool's candidates gets the next request.

A candidate is an upstream that is in rotation (not ejected, health check passing), below its
`max_connections` and not already tried by this request; the pool handles the rest (what to do
when there is none, counting, outlier ejection). Every policy honours the weights.

- `least_outstanding`: the fewest requests in flight per unit of weight; ties to the fewest
  served per weight, starting after the last pick (the pool's original balancing).
- `round_robin`: smooth weighted round robin (nginx's): over any `sum(weights)` picks, each
  candidate gets its weight's share, interleaved.
- `prefix_affinity`: the cheapest upstream for this prompt, cost counted in prompt tokens:

      cost(u) = 16 × (blocks − cached(u))  +  load(u) / weight(u)

  `cached(u)` is how many leading blocks of the prompt u probably holds: what this replica's
  index (`prefix_index.py`) remembers sending it, and all of them for the conversation's *home*.
  The home is the rendezvous (highest-random-weight) choice among the candidates for the prompt's
  anchor block: a pure function of the anchor and the upstream URLs, so every replica names the
  same home without talking to the others, and an upstream that joins, leaves or is ejected
  moves only the conversations whose home it is or becomes. `load(u)`, with the server's scraped
  metrics (`load.py`): `waiting_tokens × (waiting + requests sent since the scrape) +
  running_tokens × running + kv_tokens × kv_usage`; without them, `inflight_tokens × requests in
  flight from this replica`. So a prompt stays where its prefix is cached until the extra wait
  there costs more than the prefill it saves, in tokens; divide by the server's prefill rate
  (tokens/s) for seconds. Ties go to the higher rendezvous rank, so idle replicas agree.
  Bounded load (`load_bound` c, Mirrokni et al. 2018): a candidate with more than
  ceil(c × (in flight + 1) × weight / total weight) of this replica's requests in flight loses
  its affinity (it competes on load alone, and the home is the next in rendezvous rank, the same
  spill-over on every replica), so that no queue grows while others have room.
  A prompt without a full block has nothing to reuse: least outstanding picks for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING

from gateway.config import ModelRoute
from gateway.upstream.blocks import BLOCK_TOKENS
from gateway.upstream.load import scraped
from gateway.upstream.prefix_index import PrefixIndex, PromptBlocks

if TYPE_CHECKING:
    from gateway.upstream.pool import Pool, Upstream

_MASK = (1 << 64) - 1


def upstream_seed(root: str) -> int:
    """A 64-bit seed of an upstream's URL, the same in every process."""
    return int.from_bytes(blake2b(root.encode(), digest_size=8).digest(), "little")


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of `x`."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def rendezvous_score(anchor: int, seed: int, weight: int) -> float:
    """Weighted rendezvous score: the highest wins, each upstream with odds ∝ its weight."""
    unit = (_mix(anchor ^ seed) + 0.5) / 2.0**64  # in (0, 1)
    return -weight / math.log(unit)


class LeastOutstanding:
    name = "least_outstanding"

    def choose(self, pool: Pool, candidates: Sequence[Upstream], prompt: PromptBlocks | None, now: float) -> Upstream:
        best = candidates[0]  # candidates come in rotation order, starting after the last pick
        best_load = (best.outstanding / best.weight, best.served / best.weight)
        for upstream in candidates:
            load = (upstream.outstanding / upstream.weight, upstream.served / upstream.weight)
            if load < best_load:
                best, best_load = upstream, load
        return best

    def sent(self, upstream: Upstream, prompt: PromptBlocks | None) -> None:
        pass


class RoundRobin:
    name = "round_robin"

    def choose(self, pool: Pool, candidates: Sequence[Upstream], prompt: PromptBlocks | None, now: float) -> Upstream:
        total = 0
        best = candidates[0]
        for upstream in candidates:
            upstream.rr_current += upstream.weight
            total += upstream.weight
            if upstream.rr_current > best.rr_current:
                best = upstream
        best.rr_current -= total
        return best

    def sent(self, upstream: Upstream, prompt: PromptBlocks | None) -> None:
        pass


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, route: ModelRoute, indexes: dict[str, PrefixIndex]) -> None:
        self.settings = route.prefix_affinity
        self.indexes = indexes  # upstream root → what was sent there
        self._fallback = LeastOutstanding()

    def choose(self, pool: Pool, candidates: Sequence[Upstream], prompt: PromptBlocks | None, now: float) -> Upstream:
        if prompt is None or len(candidates) == 1:
            return self._fallback.choose(pool, candidates, prompt, now)
        s = self.settings
        ids = prompt.ids
        in_flight = 0
        total_weight = 0
        for upstream in candidates:
            in_flight += upstream.outstanding
            total_weight += upstream.weight
        bound = s.load_bound * (in_flight + 1) / total_weight
        home: Upstream | None = None
        home_score = -1.0
        scored: list[tuple[Upstream, float, float, bool]] = []  # upstream, rendezvous score, load, bounded
        for upstream in candidates:
            score = rendezvous_score(prompt.anchor, upstream.seed, upstream.weight)
            sample = scraped(pool, upstream, now)
            if sample is None:
                load = s.inflight_tokens * upstream.outstanding
            else:
                sent_since = max(0, upstream.outstanding - sample.outstanding)
                load = (s.waiting_tokens * (sample.waiting + sent_since) + s.running_tokens * sample.running
                        + s.kv_tokens * sample.kv_usage)  # fmt: skip
            bounded = s.load_bound > 0 and upstream.outstanding >= math.ceil(bound * upstream.weight)
            scored.append((upstream, score, load / upstream.weight, bounded))
            if not bounded and score > home_score:
                home, home_score = upstream, score
        blocks = len(ids)
        best = candidates[0]
        best_key = (math.inf, 0.0)
        for upstream, score, load, bounded in scored:
            if upstream is home:
                cached = blocks
            elif bounded:
                cached = 0
            else:
                cached = self.indexes[upstream.root].cached_blocks(ids)
            key = (BLOCK_TOKENS * (blocks - cached) + load, -score)
            if key < best_key:
                best, best_key = upstream, key
        return best

    def sent(self, upstream: Upstream, prompt: PromptBlocks | None) -> None:
        if prompt is not None:
            self.indexes[upstream.root].sent(prompt.ids)


Policy = LeastOutstanding | RoundRobin | PrefixAffinity


def make_policy(route: ModelRoute, indexes: dict[str, PrefixIndex]) -> Policy:
    if route.routing == "round_robin":
        return RoundRobin()
    if route.routing == "least_outstanding":
        return LeastOutstanding()
    return PrefixAffinity(route, indexes)
