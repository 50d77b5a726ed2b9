"""The `sim-upstream` command's arguments, added to the gateway's parser by `gateway.cli`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.sim.calibration import SimConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


def _scale(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def add_parser(commands: Any) -> None:
    d = SimConfig()
    sim = commands.add_parser("sim-upstream", help="run a simulated continuous-batching model server")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=9001)
    sim.add_argument("--max-num-seqs", type=_positive_int, default=d.max_num_seqs, help="running requests at most")
    sim.add_argument("--kv-blocks", type=_positive_int, default=d.kv_blocks, help="KV-cache blocks of 16 tokens")
    sim.add_argument("--max-batched-tokens", type=_positive_int, default=d.max_batched_tokens,
                     help="token budget of one engine step")  # fmt: skip
    sim.add_argument("--max-model-len", type=_positive_int, default=d.max_model_len, help="longest prompt in tokens")
    sim.add_argument("--step-base", type=_seconds, default=d.step_base, help="seconds of every step")
    sim.add_argument("--per-prefill-token", type=_seconds, default=d.per_prefill_token,
                     help="seconds per prompt token prefilled")  # fmt: skip
    sim.add_argument("--per-seq", type=_seconds, default=d.per_seq, help="seconds per running request per step")
    sim.add_argument("--time-scale", type=_scale, default=1.0, help="divide every duration by this")
    sim.add_argument("--model-name", default=d.model_name, help="the model_name label on /metrics")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        config = SimConfig(
            max_num_seqs=args.max_num_seqs, kv_blocks=args.kv_blocks, max_batched_tokens=args.max_batched_tokens,
            max_model_len=args.max_model_len, step_base=args.step_base, per_prefill_token=args.per_prefill_token,
            per_seq=args.per_seq, time_scale=args.time_scale, model_name=args.model_name,
        )  # fmt: skip
    except ValueError as exc:
        print(f"liutong-gateway sim-upstream: {exc}", file=sys.stderr)
        return 2
    from gateway.sim.server import run_sim_upstream

    run_sim_upstream(config, args.host, args.port)
    return 0
