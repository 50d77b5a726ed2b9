"""The simulated KV cache: a fixed number of blocks, prefix caching keyed by block id, LRU eviction.

A request holds its blocks from admission until it finishes: its prompt's full blocks under their
chained ids (shared with every other request holding the same id) and private blocks for the rest
of its prompt and its answer. A block no request holds stays cached, for a later prompt with the
same prefix, until its space is needed: then the least recently released goes first. A finishing
request releases its blocks last first, so that a prompt's tail is evicted before its head, as
vLLM's free-block queue does. `cached_prefix` counts the prefix-cache queries and hits in tokens,
as vLLM's `prefix_cache_queries`/`prefix_cache_hits` counters do.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


class KVCache:
    def __init__(self, capacity: int, block_tokens: int) -> None:
        self.capacity = capacity
        self.block_tokens = block_tokens
        self._refs: dict[int, int] = {}  # cached block id -> requests holding it
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict()  # unheld, LRU first
        self.private = 0  # blocks held without an id
        self.queries = 0
        self.hits = 0

    @property
    def held(self) -> int:
        """Blocks some request holds (cached free blocks are reusable, so not counted)."""
        return len(self._refs) - len(self._free) + self.private

    @property
    def usage(self) -> float:
        return self.held / self.capacity

    def cached_prefix(self, ids: Sequence[int], prompt_tokens: int) -> int:
        """How many leading blocks of `ids` are cached; counted as a query of `prompt_tokens`."""
        hit = 0
        for block in ids:
            if block not in self._refs:
                break
            hit += 1
        self.queries += prompt_tokens
        self.hits += hit * self.block_tokens
        return hit

    def contains(self, block: int) -> bool:
        return block in self._refs

    def try_hold(self, ids: Sequence[int], private: int) -> bool:
        """Hold the blocks `ids` (cached or new) plus `private` more, evicting LRU free blocks; or
        change nothing and return False when they cannot all fit."""
        new = sum(1 for block in ids if block not in self._refs)
        reused_free = sum(1 for block in ids if block in self._free)
        # Blocks available = never used + free cached blocks not among ours.
        available = self.capacity - len(self._refs) + len(self._free) - reused_free
        if new + private > available:
            return False
        for block in ids:
            refs = self._refs.get(block)
            if refs is None:
                while len(self._refs) + self.private >= self.capacity:
                    evicted, _ = self._free.popitem(last=False)
                    del self._refs[evicted]
                self._refs[block] = 1
            else:
                if refs == 0:
                    del self._free[block]
                self._refs[block] = refs + 1
        for _ in range(private):
            while len(self._refs) + self.private >= self.capacity:
                evicted, _ = self._free.popitem(last=False)
                del self._refs[evicted]
            self.private += 1
        return True

    def release(self, ids: Sequence[int], private: int) -> None:
        """Give back what `try_hold` took; the last block first into the LRU order."""
        self.private -= private
        for block in reversed(ids):
            refs = self._refs[block] - 1
            self._refs[block] = refs
            if refs == 0:
                self._free[block] = None
