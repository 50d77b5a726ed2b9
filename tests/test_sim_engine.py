"""The simulator's model, driven step by step on a virtual clock (no sockets, no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sim.calibration import SimConfig
from gateway.sim.engine import Engine, SimRequest
from gateway.sim.kvcache import KVCache
from gateway.upstream.blocks import block_hashes


class VirtualEngine:
    def __init__(self, **config: object) -> None:
        self.now = 0.0
        self.engine = Engine(SimConfig(**config), clock=lambda: self.now)  # type: ignore[arg-type]

    def step(self) -> bool:
        step = self.engine.plan()
        if step is None:
            return False
        self.now += step.seconds
        self.engine.finish(step)
        return True

    def drain(self) -> None:
        while self.step():
            pass


def request(words: list[str], out: int) -> SimRequest:
    return SimRequest(block_hashes(words), len(words), out)


def words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_a_cached_prefix_shortens_ttft_by_what_the_formula_says() -> None:
    sim = VirtualEngine(step_base=0.005, per_prefill_token=0.0001, per_seq=0.001)
    shared = words("s", 320)  # 20 full blocks
    first = request(shared + words("a", 40), 1)
    sim.engine.submit(first)
    sim.drain()
    assert first.first_token_at == pytest.approx(0.005 + 0.0001 * 360 + 0.001)
    start = sim.now
    second = request(shared + words("b", 40), 1)
    sim.engine.submit(second)
    sim.drain()
    # 320 cached tokens need no prefill: only the 40 new ones do.
    assert second.cached_tokens == 320
    assert second.first_token_at is not None
    assert second.first_token_at - start == pytest.approx(0.005 + 0.0001 * 40 + 0.001)
    assert sim.engine.cache.hits == 320 and sim.engine.cache.queries == 720


def test_a_fully_cached_prompt_still_prefills_its_last_token() -> None:
    sim = VirtualEngine(step_base=0.005, per_prefill_token=0.0001, per_seq=0.0)
    prompt = words("p", 32)
    for _ in range(2):
        r = request(prompt, 1)
        start = sim.now
        sim.engine.submit(r)
        sim.drain()
    assert r.first_token_at is not None and r.first_token_at - start == pytest.approx(0.005 + 0.0001)


def test_waiting_grows_when_slots_are_full_and_drains_fcfs() -> None:
    sim = VirtualEngine(max_num_seqs=2)
    reqs = [request(words(f"r{i}", 16), 5) for i in range(5)]
    for r in reqs:
        sim.engine.submit(r)
    sim.step()
    assert len(sim.engine.running) == 2 and len(sim.engine.waiting) == 3
    assert [r.state for r in reqs] == ["running", "running", "waiting", "waiting", "waiting"]
    sim.drain()
    firsts = [r.first_token_at for r in reqs]
    assert all(t is not None for t in firsts)
    assert firsts == sorted(firsts)  # type: ignore[type-var]
    assert firsts[2] > firsts[1]  # type: ignore[operator]


def test_each_step_decodes_one_token_per_running_request_and_times_the_batch() -> None:
    sim = VirtualEngine(step_base=0.01, per_prefill_token=0.0, per_seq=0.002)
    a, b = request(words("a", 16), 3), request(words("b", 16), 3)
    sim.engine.submit(a)
    sim.engine.submit(b)
    sim.drain()
    # 3 steps of 2 running: the prefill step gives token 1, two decode steps give 2 and 3.
    assert a.finished_at == pytest.approx(3 * (0.01 + 2 * 0.002))
    assert a.generated == b.generated == 3


def test_the_prefill_budget_chunks_long_prompts() -> None:
    sim = VirtualEngine(max_batched_tokens=100, step_base=0.001, per_prefill_token=0.001, per_seq=0.0)
    r = request(words("x", 250), 1)
    sim.engine.submit(r)
    steps = 0
    while sim.step():
        steps += 1
    assert steps == 3 and r.first_token_at == pytest.approx(3 * 0.001 + 0.25)


def test_eviction_is_lru_over_blocks_no_running_request_holds() -> None:
    cache = KVCache(capacity=4, block_tokens=16)
    a, b, c = (block_hashes(words(p, 32)) for p in "abc")  # 2 blocks each
    assert cache.try_hold(a, 0)
    cache.release(a, 0)
    assert cache.try_hold(b, 0)
    cache.release(b, 0)
    # Touch a again: now b is the least recently used.
    assert cache.cached_prefix(a, 32) == 2 and cache.try_hold(a, 0)
    cache.release(a, 0)
    assert cache.try_hold(c, 0)
    assert not any(cache.contains(x) for x in b) and all(cache.contains(x) for x in a)


def test_held_blocks_are_never_evicted_and_a_request_that_does_not_fit_waits() -> None:
    cache = KVCache(capacity=4, block_tokens=16)
    a, b = block_hashes(words("a", 48)), block_hashes(words("b", 32))
    assert cache.try_hold(a, 0)
    assert not cache.try_hold(b, 0)  # 3 held + 2 new > 4
    assert all(cache.contains(x) for x in a) and cache.held == 3
    sim = VirtualEngine(kv_blocks=4)
    big, small = request(words("a", 48), 16), request(words("b", 16), 1)
    sim.engine.submit(big)
    sim.engine.submit(small)
    sim.step()
    assert small.state == "waiting"  # 4 blocks for big (3 prompt + 1 answer); none left
    sim.drain()
    assert small.state == "finished"


def test_a_release_evicts_the_tail_of_a_prompt_before_its_head() -> None:
    cache = KVCache(capacity=3, block_tokens=16)
    a = block_hashes(words("a", 48))
    assert cache.try_hold(a, 0)
    cache.release(a, 0)
    assert cache.try_hold(block_hashes(words("z", 16)), 0)
    assert cache.contains(a[0]) and cache.contains(a[1]) and not cache.contains(a[2])


def test_time_scale_divides_the_sleep_and_not_the_model() -> None:
    async def main(scale: float) -> list[float]:
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            if len(slept) >= 3:
                raise asyncio.CancelledError

        engine = Engine(
            SimConfig(time_scale=scale, step_base=0.01, per_prefill_token=0.0, per_seq=0.0), clock=lambda: 0.0
        )
        engine.submit(request(words("a", 16), 10))
        with pytest.raises(asyncio.CancelledError):
            await engine.run(sleep)
        return slept

    assert asyncio.run(main(1.0)) == pytest.approx([0.01] * 3)
    assert asyncio.run(main(4.0)) == pytest.approx([0.0025] * 3)


def test_an_aborted_request_frees_its_slot_and_blocks() -> None:
    sim = VirtualEngine(max_num_seqs=1)
    a, b = request(words("a", 16), 100), request(words("b", 16), 1)
    sim.engine.submit(a)
    sim.engine.submit(b)
    sim.step()
    sim.engine.abort(a)
    assert sim.engine.cache.held == 0 and a.state == "aborted"
    sim.drain()
    assert b.state == "finished"


def test_bad_settings_name_their_field() -> None:
    with pytest.raises(ValueError, match="kv_blocks"):
        SimConfig(kv_blocks=0)
    with pytest.raises(ValueError, match="time_scale"):
        SimConfig(time_scale=0)
