"""Routing policies, unit level with an injected clock: round robin, least outstanding and
prefix affinity (cache vs load, bounded load, replicas agreeing, movement on add/remove/eject)."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc

from gateway.config import HealthCheck, ModelRoute, PrefixAffinity, Timeouts
from gateway.upstream.blocks import BLOCK_TOKENS, message_block_hashes
from gateway.upstream.load import LoadSample
from gateway.upstream.pool import EJECT_AFTER_FAILURES, EJECT_SECONDS, Pool, build_pools
from gateway.upstream.prefix_index import PrefixIndex, PromptBlocks, prompt_blocks


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ROOTS = ("http://a:1", "http://b:1", "http://c:1", "http://d:1")
SYSTEM = " ".join(f"rule{i}" for i in range(200))  # a long shared system prompt


def route(roots=ROOTS, routing="prefix_affinity", weights=(), **affinity) -> ModelRoute:
    return ModelRoute("m", tuple(roots), Timeouts(), weights=tuple(weights), routing=routing,
                      prefix_affinity=PrefixAffinity(**affinity))  # fmt: skip


def conversation(c: int, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"conversation {c} question {t} " + "why " * 20})
        messages.append({"role": "assistant", "content": f"answer {t} of {c} " + "because " * 30})
    return messages[:-1]  # ends with the user's turn


def prompt(pool: Pool, messages) -> PromptBlocks:
    blocks = pool.prompt_of(messages)
    assert blocks is not None
    return blocks


def send(pool: Pool, messages) -> str:
    """Pick for `messages` and finish the request at once (no load left behind)."""
    return pool.pick(prompt=prompt(pool, messages)).root


# --- prompt blocks ---------------------------------------------------------------------------


def test_prompt_blocks_are_the_shared_block_ids_and_the_anchor_stays_put_as_a_conversation_grows():
    for turns in (1, 2, 5):
        messages = conversation(7, turns)
        blocks = prompt_blocks(messages, 128)
        assert blocks is not None
        assert blocks.ids == message_block_hashes(messages, 128)
    anchors = {prompt_blocks(conversation(7, t), 128).anchor for t in (1, 2, 3, 6)}  # type: ignore[union-attr]
    assert len(anchors) == 1
    assert prompt_blocks(conversation(8, 2), 128).anchor not in anchors  # type: ignore[union-attr]
    # the anchor lies past the shared system prompt: the conversation, not the system prompt, names it
    assert prompt_blocks(conversation(7, 1), 128).anchor != prompt_blocks(conversation(8, 1), 128).anchor  # type: ignore[union-attr]


def test_prompts_of_any_shape_hash_in_bounded_time_and_memory():
    assert prompt_blocks([{"role": "user", "content": ""}], 128) is None
    assert prompt_blocks([{"role": "user", "content": "too short"}], 128) is None
    assert prompt_blocks([], 128) is None
    assert prompt_blocks(["junk", {"role": 5, "content": {"x": 1}}, None], 128) is None
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "字 " * 40}, {"type": "image_url", "image_url": {}}]}
    ]
    assert len(prompt_blocks(parts, 128).ids) == 2  # type: ignore[union-attr]
    assert prompt_blocks([{"role": "user", "content": "\ud800 " * 40}], 128) is not None  # lone surrogate
    one_word = [{"role": "user", "content": "x" * 1_000_000}]
    many_words = [{"role": "user", "content": "word " * 200_000}]
    tracemalloc.start()
    started = time.perf_counter()
    assert prompt_blocks(one_word, 128) is None  # one 1 MB word: no full block
    big = prompt_blocks(many_words, 128)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert big is not None and len(big.ids) == 128
    assert elapsed < 2.0  # generous bound for a loaded machine; the work is capped by max_blocks
    assert peak < 8 * 1024 * 1024  # the words past 2,048 are never split out


def test_the_index_keeps_a_prefix_of_every_chain_and_forgets_least_recent_first():
    index = PrefixIndex(capacity=10)
    a = list(range(100, 108))
    index.sent(a)
    assert index.cached_blocks(a) == 8
    assert index.cached_blocks(a[:3] + [1, 2]) == 3
    b = list(range(200, 206))
    index.sent(b)  # 14 blocks > 10: a's deepest 4 go
    assert len(index) == 10
    assert index.cached_blocks(a) == 4 and index.cached_blocks(b) == 6
    index.resize(3)
    assert index.cached_blocks(b) == 3 and index.cached_blocks(a) == 0


# --- round robin and least outstanding ----------------------------------------------------------


def test_round_robin_follows_the_weights_interleaved_and_skips_what_is_out():
    clock = FakeClock()
    pool = Pool(route(ROOTS[:3], "round_robin", weights=(3, 1, 1)), clock)
    picks = [pool.pick().root for _ in range(10)]
    assert picks.count(ROOTS[0]) == 6 and picks.count(ROOTS[1]) == 2 and picks.count(ROOTS[2]) == 2
    assert all(picks[i : i + 3].count(ROOTS[0]) < 3 for i in range(8))  # interleaved, not in runs
    for _ in range(EJECT_AFTER_FAILURES):
        pool.failed(pool.upstreams[0])
    assert {pool.pick().root for _ in range(6)} == {ROOTS[1], ROOTS[2]}
    clock.now += EJECT_SECONDS
    assert ROOTS[0] in {pool.pick().root for _ in range(5)}
    assert pool.pick(avoid=pool.upstreams[1:]).root == ROOTS[0]


def test_least_outstanding_is_unchanged_and_a_prompt_does_not_change_it():
    pool = Pool(route(ROOTS[:3], "least_outstanding"), FakeClock())
    assert pool.prompt_of(conversation(1, 3)) is None  # no hashing for a policy that does not use it
    assert [pool.pick().root for _ in range(6)] == list(ROOTS[:3]) * 2
    pool.upstreams[0].outstanding = 2
    pool.upstreams[1].outstanding = 1
    assert pool.pick().root == ROOTS[2]


# --- prefix affinity ------------------------------------------------------------------------------


def test_a_conversation_stays_on_one_upstream_and_conversations_spread():
    pool = Pool(route(), FakeClock())
    homes = {}
    for c in range(40):
        chosen = {send(pool, conversation(c, t)) for t in range(1, 5)}
        assert len(chosen) == 1
        homes[c] = chosen.pop()
    counts = [list(homes.values()).count(root) for root in ROOTS]
    assert min(counts) >= 4  # rendezvous spreads the conversations (expected 10 each)


def test_a_prompt_without_blocks_is_balanced_by_least_outstanding():
    pool = Pool(route(ROOTS[:2]), FakeClock())
    short = [{"role": "user", "content": "hi"}]
    assert pool.prompt_of(short) is None
    pool.upstreams[0].outstanding = 1
    assert pool.pick(prompt=pool.prompt_of(short)).root == ROOTS[1]


def test_two_replicas_agree_without_talking():
    one, two = Pool(route(), FakeClock()), Pool(route(), FakeClock())
    for c in range(30):
        for t in range(1, 4):
            # each replica sees only some turns of each conversation
            replica = (one, two)[(c + t) % 2]
            other = (two, one)[(c + t) % 2]
            assert send(replica, conversation(c, t)) == send(other, conversation(c, t))


def test_a_loaded_home_keeps_a_conversation_until_the_wait_costs_more_than_the_prefill_saved():
    clock = FakeClock()
    pool = Pool(route(ROOTS[:2], inflight_tokens=100.0, load_bound=0), clock)
    messages = conversation(3, 4)
    blocks = prompt(pool, messages)
    home = pool.pick(prompt=blocks)
    other = next(u for u in pool.upstreams if u is not home)
    saved = BLOCK_TOKENS * len(blocks.ids)  # the other has none of it cached
    home.outstanding = saved // 100  # wait on the home: 100 tokens per request in flight
    assert home.outstanding * 100 <= saved
    assert pool.pick(prompt=blocks) is home
    home.outstanding = saved // 100 + 1  # now the wait costs more than the prefill it saves
    assert pool.pick(prompt=blocks) is other


def test_after_a_move_this_replicas_index_keeps_the_conversation_where_it_went():
    pool = Pool(route(ROOTS[:2], inflight_tokens=1000.0, load_bound=0), FakeClock())
    blocks = prompt(pool, conversation(5, 3))
    home = pool.pick(prompt=blocks)
    other = next(u for u in pool.upstreams if u is not home)
    home.outstanding = 100
    assert pool.pick(prompt=blocks) is other  # moved by load: the other was sent the whole prompt
    home.outstanding = 0
    other.outstanding = 1  # a little load on the other: less than the prefill the home would redo? no: home
    longer = prompt(pool, conversation(5, 4))
    # both hold the prompt's prefix now; the cheaper one wins: the home (no load)
    assert pool.pick(prompt=longer) is home
    other.outstanding = 0
    home.outstanding = 1
    assert pool.pick(prompt=longer) is other  # equal cache, the less loaded one


def test_scraped_load_is_used_while_fresh_and_local_load_after():
    clock = FakeClock()
    r = dataclasses.replace(route(ROOTS[:2], load_bound=0), metrics_path="/metrics", load_poll_interval=0.5)
    pool = Pool(r, clock)
    blocks = prompt(pool, conversation(9, 2))
    home = pool.pick(prompt=blocks)
    other = next(u for u in pool.upstreams if u is not home)
    home.load = LoadSample(waiting=20, running=8, kv_usage=0.9, at=clock.now, outstanding=0)
    other.load = LoadSample(waiting=0, running=2, kv_usage=0.1, at=clock.now, outstanding=0)
    assert pool.pick(prompt=blocks) is other  # 20 waiting × 512 tokens > the prompt's prefill
    clock.now += 1.6  # over 3 polls old: stale, local load (none in flight) again
    assert pool.pick(prompt=blocks) is home


def test_bounded_load_stops_a_hot_conversation_from_queueing_on_one_upstream():
    pool = Pool(route(ROOTS[:2], load_bound=1.5, inflight_tokens=0.0), FakeClock())
    blocks = prompt(pool, conversation(11, 3))
    held = []
    for _ in range(10):  # the same prompt, many times at once (requests stay in flight)
        upstream = pool.pick(prompt=blocks)
        upstream.outstanding += 1
        held.append(upstream)
    counts = sorted(held.count(u) for u in pool.upstreams)
    assert counts == [2, 8]  # the home takes at most ceil(1.5 × (n + 1) / 2); the rest spills
    unbounded = Pool(route(ROOTS[:2], load_bound=0, inflight_tokens=0.0), FakeClock())
    for _ in range(10):
        unbounded.pick(prompt=blocks).outstanding += 1
    assert sorted(u.outstanding for u in unbounded.upstreams) == [0, 10]  # what the bound prevents


def test_weights_bias_the_homes():
    pool = Pool(route(ROOTS[:2], weights=(3, 1)), FakeClock())
    homes = [send(pool, conversation(c, 1)) for c in range(400)]
    share = homes.count(ROOTS[0]) / len(homes)
    assert 0.65 < share < 0.85  # expected 0.75


def _homes(pool: Pool, count: int = 300) -> dict[int, str]:
    return {c: send(pool, conversation(c, 2)) for c in range(count)}


def test_ejecting_an_upstream_moves_only_its_own_conversations_and_they_come_back():
    clock = FakeClock()
    pool = Pool(route(), clock)
    before = _homes(pool)
    ejected = pool.upstreams[1]
    for _ in range(EJECT_AFTER_FAILURES):
        pool.failed(ejected)
    during = _homes(pool)
    moved = {c for c in before if before[c] != during[c]}
    assert moved == {c for c in before if before[c] == ejected.root}
    assert 0 < len(moved) < 150
    clock.now += EJECT_SECONDS
    pool.succeeded(ejected)
    assert _homes(pool) == before  # its conversations return to it, the others never moved


def test_adding_or_removing_an_upstream_moves_only_its_share():
    three = Pool(route(ROOTS[:3]), FakeClock())
    four = Pool(route(ROOTS), FakeClock())
    before, after = _homes(three), _homes(four)
    moved = {c for c in before if before[c] != after[c]}
    assert all(after[c] == ROOTS[3] for c in moved)  # only to the newcomer
    assert 40 < len(moved) < 110  # about a quarter of 300
    removed = Pool(route(ROOTS[1:]), FakeClock())
    gone = _homes(removed)
    assert all(gone[c] == after[c] for c in after if after[c] != ROOTS[0])


def test_a_retry_avoids_the_upstream_that_failed_and_full_upstreams_are_skipped():
    pool = Pool(dataclasses.replace(route(ROOTS[:3]), max_connections=(1, 0, 0)), FakeClock())
    blocks = prompt(pool, conversation(2, 2))
    first = pool.pick(prompt=blocks)
    retry = pool.pick(avoid=[first], prompt=blocks)
    assert retry is not first
    full = pool.upstreams[0]
    full.outstanding = 1
    assert all(pool.pick(prompt=prompt(pool, conversation(c, 1))) is not full for c in range(30))


def test_a_reload_keeps_what_each_remaining_upstream_was_sent():
    clock = FakeClock()
    old = build_pools({"m": route(ROOTS[:2])}, clock)
    blocks = prompt(old["m"], conversation(4, 2))
    sent_to = old["m"].pick(prompt=blocks).root
    new = build_pools({"m": route((ROOTS[0], ROOTS[2]), routing="prefix_affinity", index_blocks=5)}, clock, old)
    assert new["m"].indexes[ROOTS[0]] is old["m"].indexes[ROOTS[0]]
    assert len(new["m"].indexes[ROOTS[0]]) == (5 if sent_to == ROOTS[0] else 0)
    assert len(new["m"].indexes[ROOTS[2]]) == 0
    assert ROOTS[1] not in new["m"].indexes


def test_an_upstream_failing_its_health_checks_loses_its_conversations_until_it_passes():
    clock = FakeClock()
    r = dataclasses.replace(route(), health_check=HealthCheck(unhealthy_after=1, healthy_after=1))
    pool = Pool(r, clock)
    before = _homes(pool, 100)
    sick = pool.upstreams[2]
    pool.checked(sick, ok=False)
    during = _homes(pool, 100)
    assert sick.root not in during.values()
    assert all(during[c] == before[c] for c in before if before[c] != sick.root)
    pool.checked(sick, ok=True)
    assert _homes(pool, 100) == before
