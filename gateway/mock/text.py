"""The mock upstream's deterministic text: completion token *k* of choice *c* is word
``(crc32(model + "\\0" + prompt) + 23*c + k) mod 64`` of a fixed 64-word list, the first token bare
and every later one with its leading space (one word = one token); and its prompt-token estimate.
Shared by the mock server, the model-server simulator and the benchmarks' upstreams.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any, Final

import orjson

_WORDS: Final = tuple(
    """amber river lantern quiet harbor meadow silver orchard compass thunder velvet canyon ember
    glacier willow falcon prism beacon marble horizon cedar tundra saffron echo garnet summit
    pebble aurora juniper quartz ripple meridian cobalt fennel lagoon tapestry zephyr basalt
    citrus driftwood nebula obsidian paprika quill rosewood sierra tidal umber vortex walnut
    yonder zinnia bramble cascade dune fjord grotto hollow indigo jasmine kestrel lichen mosaic
    nectar""".split()
)
_CHOICE_STRIDE: Final = 23
# (text, JSON-encoded text) of each word as a first token and as a later token.
_FIRST: Final = tuple((w, orjson.dumps(w)) for w in _WORDS)
_LATER: Final = tuple((" " + w, orjson.dumps(" " + w)) for w in _WORDS)

Token = tuple[str, bytes]


def estimate_prompt_tokens(messages: Sequence[Any]) -> int:
    """2 + for each message 4 + ceil(len(content) / 4); non-string content counts as ""."""
    total = 2
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += 4 + (math.ceil(len(content) / 4) if isinstance(content, str) else 0)
    return total


def generate_tokens(model: str, prompt: str, count: int, choice: int = 0) -> list[Token]:
    """The deterministic tokens (text, JSON-encoded text) of one choice, before stop strings."""
    start = zlib.crc32(f"{model}\0{prompt}".encode()) + _CHOICE_STRIDE * choice
    size = len(_WORDS)
    return [(_LATER if k else _FIRST)[(start + k) % size] for k in range(count)]


def apply_stop(tokens: list[Token], stops: Sequence[str]) -> list[Token] | None:
    """The tokens before the earliest stop string, or None when no stop string occurs."""
    text = "".join(t for t, _ in tokens)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not found:
        return None
    cut, pos, kept = min(found), 0, []
    for token in tokens:
        if pos + len(token[0]) <= cut:
            kept.append(token)
            pos += len(token[0])
            continue
        if cut > pos:
            part = token[0][: cut - pos]
            kept.append((part, orjson.dumps(part)))
        break
    return kept
