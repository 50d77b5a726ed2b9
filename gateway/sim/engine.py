"""The simulated continuous-batching engine: admission, the step plan, and its timing.

Each step, in this order: admit waiting requests first come first served while fewer than
`max_num_seqs` run and the head's blocks fit in the KV cache (the head blocks the rest, as in
vLLM's FCFS policy); spend the token budget `max_batched_tokens` on one decode token for every
running request that has its first token, then on the uncached prompt tokens of the requests
still prefilling, in admission order (chunked prefill); take
`step_base + per_prefill_token × prefill tokens + per_seq × running` seconds of model time;
then every decoding request has one more token, a request whose prefill finished has its first
token (its TTFT), and a request with all its tokens finishes and releases its blocks. A request
whose whole prompt is cached still prefills its last token, as vLLM recomputes it.

Time is the model's: `plan` and `finish` take no time of their own, `run` sleeps each step's
duration divided by `time_scale` on the event loop and waits on an event, using no CPU, when
nothing is running or waiting. Unit tests drive `plan`/`finish` with a virtual clock.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable

from gateway.sim.calibration import SimConfig
from gateway.sim.kvcache import KVCache


@dataclasses.dataclass(slots=True, eq=False)
class SimRequest:
    """One request in the engine; `generated` and `changed` are what its HTTP handler watches."""

    block_ids: list[int]
    prompt_tokens: int
    output_tokens: int
    arrived: float = 0.0
    cached_tokens: int = 0
    to_prefill: int = 0
    generated: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    private_blocks: int = 0
    state: str = "new"  # new → waiting → running → finished | aborted
    changed: asyncio.Event | None = None

    def notify(self) -> None:
        if self.changed is not None:
            self.changed.set()


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """What one step does: tokens prefilled per request, the decoders, and its model time."""

    prefill: tuple[tuple[SimRequest, int], ...]
    decode: tuple[SimRequest, ...]
    running: int
    seconds: float

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefill)


Listener = Callable[[Step, list[SimRequest], list[SimRequest]], None]


class Engine:
    def __init__(self, config: SimConfig, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.cache = KVCache(config.kv_blocks, config.block_tokens)
        self.waiting: collections.deque[SimRequest] = collections.deque()
        self.running: list[SimRequest] = []
        self._clock = clock or (lambda: time.monotonic() * config.time_scale)
        self._wake: asyncio.Event | None = None
        self.listeners: list[Listener] = []  # called after each step with (step, first tokens, finished)

    def now(self) -> float:
        """Model time."""
        return self._clock()

    def blocks_needed(self, request: SimRequest) -> int:
        """Blocks for the whole prompt and answer (ceil over block_tokens)."""
        size = self.config.block_tokens
        return -(-(request.prompt_tokens + request.output_tokens) // size)

    def fits_ever(self, request: SimRequest) -> bool:
        return self.blocks_needed(request) <= self.config.kv_blocks

    def submit(self, request: SimRequest) -> None:
        request.arrived = self.now()
        request.state = "waiting"
        self.waiting.append(request)
        if self._wake is not None:
            self._wake.set()

    def abort(self, request: SimRequest) -> None:
        """The client went away: free its slot and blocks (cached ones stay cached)."""
        if request.state == "waiting":
            self.waiting.remove(request)
        elif request.state == "running":
            self.running.remove(request)
            self._release(request)
        if request.state in ("waiting", "running", "new"):
            request.state = "aborted"

    def _release(self, request: SimRequest) -> None:
        self.cache.release(request.block_ids, request.private_blocks)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            head = self.waiting[0]
            hit = self.cache.cached_prefix(head.block_ids, head.prompt_tokens)
            private = self.blocks_needed(head) - len(head.block_ids)
            if not self.cache.try_hold(head.block_ids, private):
                # Counted as a query once it is admitted, not at every step it waits.
                self.cache.queries -= head.prompt_tokens
                self.cache.hits -= hit * self.config.block_tokens
                break
            self.waiting.popleft()
            head.private_blocks = private
            head.cached_tokens = hit * self.config.block_tokens
            head.to_prefill = max(1, head.prompt_tokens - head.cached_tokens)
            head.state = "running"
            self.running.append(head)

    def plan(self) -> Step | None:
        """Admit, then the next step's work; None when there is nothing to run."""
        self._admit()
        if not self.running:
            return None
        decode = tuple(r for r in self.running if r.to_prefill == 0)
        budget = self.config.max_batched_tokens - len(decode)
        prefill = []
        for request in self.running:
            if budget <= 0:
                break
            if request.to_prefill:
                chunk = min(request.to_prefill, budget)
                prefill.append((request, chunk))
                budget -= chunk
        running = len(self.running)
        tokens = sum(n for _, n in prefill)
        return Step(tuple(prefill), decode, running, self.config.step_seconds(tokens, running))

    def finish(self, step: Step) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply a planned step at its end (now); returns (requests with a first token, finished)."""
        now = self.now()
        first, done = [], []
        for request, chunk in step.prefill:
            if request.state != "running":
                continue
            request.to_prefill -= chunk
            if request.to_prefill == 0:
                request.generated = 1
                request.first_token_at = now
                first.append(request)
        for request in step.decode:
            if request.state == "running":
                request.generated += 1
        for request in [*first, *step.decode]:
            if request.state == "running" and request.generated >= request.output_tokens:
                request.state = "finished"
                request.finished_at = now
                self.running.remove(request)
                self._release(request)
                done.append(request)
        for request in [*first, *step.decode]:
            request.notify()
        for listener in self.listeners:
            listener(step, first, done)
        return first, done

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """The engine loop: steps while there is work, waits on an event (no CPU) when idle."""
        self._wake = asyncio.Event()
        while True:
            step = self.plan()
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            await sleep(step.seconds / self.config.time_scale)
            self.finish(step)
