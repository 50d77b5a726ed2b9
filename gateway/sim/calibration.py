"""The simulated engine's settings, and the published figure its default timing reproduces.

Source: a concurrency sweep of meta-llama/Llama-3.1-8B-Instruct (fp16) served by vLLM 0.21.0 on
one H100-80GB-HBM3, published with the InferenceBench "concurrency sweep" recipe
(https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/, captured 2026-05-16):
median time per output token 6.48 ms at concurrency 1, 6.59 ms at 4, 10.94 ms at 16, and median
TTFT 13.98 ms at concurrency 1. A decode step with r running requests takes
`step_base + per_seq × r`; the two points r = 1 and r = 16 give per_seq = (10.94 − 6.48) / 15 =
0.297 ms and step_base = 6.48 − 0.297 = 6.18 ms (r = 4 then predicts 7.37 ms against the 6.59 ms
measured: a straight line is the model, the GPU is flatter at small batches). The page does not
give its prompt length, so `per_prefill_token` comes from the H100's compute: an 8B model costs
≈ 16 GFLOP a prompt token, and ≈ 40 % of the H100's 989 dense BF16 TFLOPS gives ≈ 25,000 prompt
tokens/s, 0.04 ms a token; with it the published 13.98 ms TTFT at concurrency 1 is a
(6.18 + 0.297 + 0.04 × 188) ms step, a 188-token "chatbot-short" prompt.
`kv_blocks` defaults to what that GPU holds: Llama-3.1-8B keeps 2 × 32 layers × 8 KV heads × 128
× 2 bytes = 128 KiB a token; 80 GB × 0.9 − 16 GB of weights ≈ 56 GB ≈ 27,000 blocks of 16 tokens.
`max_num_seqs` (256) and `max_batched_tokens` (8192) are vLLM's defaults.
`tests/test_sim_calibration.py` checks that these defaults reproduce the figures above.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from gateway.upstream.blocks import BLOCK_TOKENS

PUBLISHED_SOURCE: Final = "https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/"
# (concurrency, median TPOT seconds) and the concurrency-1 median TTFT, from PUBLISHED_SOURCE.
PUBLISHED_TPOT: Final = ((1, 0.00648), (4, 0.00659), (16, 0.01094))
PUBLISHED_TTFT_C1: Final = 0.01398
PUBLISHED_TTFT_PROMPT_TOKENS: Final = 188  # implied by per_prefill_token; see the docstring


@dataclasses.dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated server's engine: capacity, timing (seconds of model time) and time scale."""

    max_num_seqs: int = 256
    kv_blocks: int = 27_000
    max_batched_tokens: int = 8192
    max_model_len: int = 131_072
    step_base: float = 0.00618
    per_prefill_token: float = 0.00004
    per_seq: float = 0.000297
    time_scale: float = 1.0
    block_tokens: int = BLOCK_TOKENS
    model_name: str = "sim"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "kv_blocks", "max_batched_tokens", "max_model_len", "block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("step_base", "per_prefill_token", "per_seq"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if self.step_base + self.per_seq <= 0:
            raise ValueError("step_base + per_seq must be > 0 (a step must take time)")

    def step_seconds(self, prefill_tokens: int, running: int) -> float:
        """Model time of one engine step."""
        return self.step_base + self.per_prefill_token * prefill_tokens + self.per_seq * running
