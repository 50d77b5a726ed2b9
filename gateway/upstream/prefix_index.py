"""Which prompt prefixes each upstream has probably cached: a prompt's blocks and a bounded LRU of block ids.

`prompt_blocks` turns a request's messages into its chained block ids (`blocks.py`: the same ids
the servers' prefix caches key on, in one pass over at most `max_blocks` blocks of words) and its
*anchor*: the last full block that ends within the conversation's first non-system message. The
anchor names the conversation: it is the same block on every turn (later turns only append), and
two conversations that share a system prompt but not their first question have different anchors.

`PrefixIndex` remembers, per upstream, the block ids the gateway sent it, at most `capacity`,
least recently sent first out. A prompt's blocks are touched last block first, so that a block
is never more recent than the blocks before it: eviction then always takes a prompt's deepest
blocks first, what is remembered of any chain is a prefix of it, and `cached_blocks` finds its
length by bisection (about log2(n) dictionary lookups).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.upstream.blocks import BLOCK_TOKENS, block_hashes, prompt_words

_SYSTEM_ROLES = frozenset(("system", "developer"))


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    ids: list[int]  # chained block ids, first block first
    anchor: int  # the conversation's block id for rendezvous hashing


def prompt_blocks(messages: Iterable[Any], max_blocks: int) -> PromptBlocks | None:
    """The prompt's blocks, or None when it has no full block (nothing a server could reuse)."""
    budget = max_blocks * BLOCK_TOKENS
    words: list[str] = []
    first_end: int | None = None
    for message in messages:
        words += prompt_words((message,), budget - len(words))
        if first_end is None and isinstance(message, dict) and message.get("role") not in _SYSTEM_ROLES:
            first_end = len(words)
        if len(words) >= budget:
            break
    ids = block_hashes(words, max_blocks)
    if not ids:
        return None
    end = len(words) if first_end is None else first_end
    anchor = ids[min(len(ids), max(1, end // BLOCK_TOKENS)) - 1]
    return PromptBlocks(ids, anchor)


class PrefixIndex:
    """The block ids sent to one upstream, least recently sent first out."""

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_blocks(self, ids: list[int]) -> int:
        """How many leading blocks of `ids` this upstream was sent (and has not aged out)."""
        blocks = self._blocks
        if not ids or ids[0] not in blocks:
            return 0
        low, high = 1, len(ids)  # ids[:low] are known; the answer is in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            if ids[mid - 1] in blocks:
                low = mid
            else:
                high = mid - 1
        return low

    def sent(self, ids: list[int]) -> None:
        """Remember that the blocks `ids` were sent to this upstream."""
        blocks = self._blocks
        for block in reversed(ids):
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def forget(self) -> None:
        self._blocks.clear()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        while len(self._blocks) > capacity:
            self._blocks.popitem(last=False)
