"""The request-path cost of routing: `Pool.prompt_of` (hashing the parsed messages) plus `Pool.pick`,
per request, for each policy, on a 4-upstream pool with a warm prefix index.

    .venv/bin/python -m bench.routing [--requests 20000]

Prompts: the benchmark's own short chat (no full block), a 10-turn conversation (~700 words), one of
2,000+ words (capped at `max_blocks` = 128 blocks), and 1 MB of text. Conversations vary (500 of
them, so the index holds many chains). Pure CPU, one process; run it on an otherwise idle core.
"""

from __future__ import annotations

import argparse
import time

from gateway.config import ModelRoute, Timeouts
from gateway.upstream.pool import Pool

ROOTS = tuple(f"http://10.0.0.{i}:8000" for i in range(1, 5))


def conversation(c: int, turns: int, words: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": " ".join(f"rule{i}" for i in range(200))}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"c{c} q{t} " + "word " * words})
        messages.append({"role": "assistant", "content": f"a{t} " + "reply " * words})
    return messages


WORKLOADS = {
    "short chat (10 words)": lambda c: [{"role": "system", "content": "You are terse."},
                                        {"role": "user", "content": "Say hello in one word."}],
    "10-turn conversation (~700 words)": lambda c: conversation(c, 10, 25),
    "long prompt (~4,000 words, 128 blocks hashed)": lambda c: conversation(c, 4, 500),
    "1 MB of text": lambda c: [{"role": "user", "content": f"c{c} " + "lorem " * 170_000}],
}  # fmt: skip


def measure(routing: str, make, requests: int) -> float:
    pool = Pool(ModelRoute("m", ROOTS, Timeouts(), routing=routing), time.monotonic)
    prompts = [make(c) for c in range(min(500, requests))]
    for messages in prompts:  # warm the index
        pool.pick(prompt=pool.prompt_of(messages))
    started = time.perf_counter()
    for i in range(requests):
        upstream = pool.pick(prompt=pool.prompt_of(prompts[i % len(prompts)]))
        upstream.outstanding += 1
        upstream.outstanding -= 1
    return (time.perf_counter() - started) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    print("| prompt | least_outstanding µs | round_robin µs | prefix_affinity µs |")
    print("|---|---:|---:|---:|")
    for name, make in WORKLOADS.items():
        n = args.requests if "1 MB" not in name else max(1, args.requests // 100)
        cells = [
            f"{measure(policy, make, n):.1f}" for policy in ("least_outstanding", "round_robin", "prefix_affinity")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
