"""Prompt blocks: the prefix-cache identity of a chat prompt, shared by the router and the simulator.

A prompt is its messages rendered in order, each as its role followed by the words of its content
(string content, or the text parts of content-part lists); a token is a whitespace-separated word,
an approximation of a real tokenizer whose block boundaries stay put when a conversation grows.
Tokens are grouped into blocks of `BLOCK_TOKENS` (16, vLLM's default block size). Block *i*'s id
is a hash chain over blocks 0 … *i*, as vLLM's automatic prefix caching keys a block by its parent's
hash and its own tokens: two prompts share block *i*'s id exactly when they share their first
16·(*i*+1) tokens. Only full blocks get an id; a partial last block is never cached.

Ids are 64-bit BLAKE2b digests, the same in every process (unlike `hash()`), so that gateway
replicas and servers agree. `max_blocks` bounds the work: words past the last wanted block are
never split out of their string, so a 1 MB prompt costs what its first blocks cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b
from typing import Any

BLOCK_TOKENS = 16


def prompt_words(messages: Iterable[Any], max_words: int | None = None) -> list[str]:
    """The prompt's tokens in order; at most `max_words` of them when given."""
    words: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if isinstance(role, str):
            words.append(role)
        content = message.get("content")
        if isinstance(content, str):
            _add_words(words, content, max_words)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                    _add_words(words, text, max_words)
        if max_words is not None and len(words) >= max_words:
            del words[max_words:]
            break
    return words


def _add_words(words: list[str], text: str, max_words: int | None) -> None:
    if max_words is None:
        words.extend(text.split())
        return
    room = max_words - len(words)
    if room <= 0:
        return
    parts = text.split(None, room)
    words.extend(parts[:room])


def block_hashes(words: list[str], max_blocks: int | None = None, block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """The chained ids of the full blocks of `words`, first block first."""
    count = len(words) // block_tokens
    if max_blocks is not None:
        count = min(count, max_blocks)
    ids: list[int] = []
    parent = b""
    for i in range(count):
        block = " ".join(words[i * block_tokens : (i + 1) * block_tokens]).encode("utf-8", "surrogatepass")
        parent = blake2b(parent + block, digest_size=8).digest()
        ids.append(int.from_bytes(parent, "little"))
    return ids


def message_block_hashes(messages: Iterable[Any], max_blocks: int | None = None) -> list[int]:
    """`block_hashes` of a chat request's messages, splitting no more words than the blocks need."""
    max_words = None if max_blocks is None else max_blocks * BLOCK_TOKENS
    return block_hashes(prompt_words(messages, max_words), max_blocks)
