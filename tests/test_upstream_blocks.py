"""Prompt block ids: chained, stable across processes, bounded in work."""

from __future__ import annotations

import subprocess
import sys
import time

from gateway.upstream.blocks import BLOCK_TOKENS, block_hashes, message_block_hashes, prompt_words


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_rendering_is_role_then_content_words_in_order() -> None:
    messages = [
        {"role": "system", "content": "be  brief\n"},
        {"role": "user", "content": [{"type": "text", "text": "hi there"}, {"type": "image_url"}]},
        "not a message",
        {"role": "assistant", "content": None},
    ]
    assert prompt_words(messages) == ["system", "be", "brief", "user", "hi", "there", "assistant"]
    assert prompt_words(messages, max_words=4) == ["system", "be", "brief", "user"]


def test_only_full_blocks_and_ids_chain_over_the_prefix() -> None:
    a = block_hashes(words(40).split())
    assert len(a) == 40 // BLOCK_TOKENS == 2
    b = block_hashes((words(16) + " x" * 16).split())
    assert b[0] == a[0] and b[1] != a[1]  # same first block, different second
    # A different first block changes every later id, even when the later tokens agree.
    c = block_hashes(("z " + " ".join(words(40).split()[1:])).split())
    assert c[0] != a[0] and c[1] != a[1]
    assert block_hashes(words(15).split()) == []


def test_a_growing_conversation_keeps_its_earlier_blocks() -> None:
    turn1 = [{"role": "system", "content": words(100, "s")}, {"role": "user", "content": words(30, "q")}]
    turn2 = [*turn1, {"role": "assistant", "content": words(50, "a")}, {"role": "user", "content": "more"}]
    first, second = message_block_hashes(turn1), message_block_hashes(turn2)
    assert second[: len(first)] == first and len(second) > len(first)


def test_ids_are_the_same_in_another_process() -> None:
    code = "from gateway.upstream.blocks import block_hashes; print(block_hashes(('é ' * 40).split()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(block_hashes(("é " * 40).split()))


def test_max_blocks_bounds_the_work_on_huge_prompts() -> None:
    huge = [{"role": "user", "content": "word " * 1_000_000}]  # ~5 MB of one word
    started = time.process_time()
    ids = message_block_hashes(huge, max_blocks=8)
    spent = time.process_time() - started
    assert len(ids) == 8 and ids == block_hashes(prompt_words(huge)[: 8 * BLOCK_TOKENS])
    # Generous CPU bound (not wall clock): splitting all 1M words would take ~50x longer than this.
    assert spent < 0.5
    assert message_block_hashes([{"role": "user", "content": "x" * 1_000_000}]) == []  # one long token
    assert message_block_hashes([{"role": "user", "content": "\ud800 " * 40}])  # lone surrogates hash too
