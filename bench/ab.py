"""Compare gateways from two or more checkouts side by side, interleaved, in one run.

Under the same redis-server, nginx and SSE upstream, each checkout's gateway runs pinned to
core 0 (all idle but the one measured) and every repeat measures each of them in turn, rotated,
so that noise from other processes falls on all of them alike. For judging one change to the
request path: the first checkout is the baseline, the table gives medians and ratios to it.

    .venv/bin/python -m bench.ab BASE_DIR CHANGED_DIR [MORE_DIRS...] [--repeats 5] [--sse-large]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.report import median_of
from bench.run import FULL, REPO, SSE_SCENARIOS, Bench, check_tools, pin_and_prioritise
from bench.stats import median, spread

ROWS: list[tuple[str, str, str, float]] = [
    # (label, scenario, key, scale)
    ("throughput, 64 connections (req/s)", "throughput", "rps", 1.0),
    ("requests per CPU-second of the gateway, 64 connections", "throughput", "_per_cpu_s", 1.0),
    ("latency p50 at 8 connections (ms)", "latency8", "p50_us", 1e-3),
    ("latency p99 at 8 connections (ms)", "latency8", "p99_us", 1e-3),
    ("latency p50 at 100 req/s (ms)", "rate100", "p50_ms", 1.0),
    ("latency p99 at 100 req/s (ms)", "rate100", "p99_ms", 1.0),
    ("SSE 100×100@10ms CPU per 1,000 events (ms)", "sse_small", "_cpu_per_k", 1.0),
    ("SSE 100×100@10ms TTFT p99 (ms)", "sse_small", "ttft_p99_ms", 1.0),
    ("SSE 500×100@50ms CPU per 1,000 events (ms)", "sse_large", "_cpu_per_k", 1.0),
    ("SSE 500×100@50ms TTFT p99 (ms)", "sse_large", "ttft_p99_ms", 1.0),
    ("SSE 500×100@50ms peak RSS (MiB)", "sse_large", "_proxy_peak_rss", 2**-20),
]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="directories holding a gateway/ package")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6, help="seconds per wrk / fixed-rate run")
    parser.add_argument("--sse-large", action="store_true", help="also 500 streams × 100 events @ 50 ms")
    parser.add_argument("--nice", type=int, default=-10)
    args = parser.parse_args()
    if not 1 <= args.repeats <= 10 or len(args.checkouts) > 4:
        parser.error("1-10 repeats, at most 4 checkouts")
    for src in args.checkouts:
        if not (src / "gateway" / "__init__.py").exists():
            parser.error(f"{src} has no gateway/ package")
    tools, _ = check_tools(need_profiler=False)
    pin_and_prioritise(args.nice)
    ns = argparse.Namespace(gateway_src=None, gateway_bin=REPO / ".venv/bin/liutong-gateway", no_profile=True)
    b = Bench(ns, FULL, tools, None)
    names = [f"gw{i}" for i in range(len(args.checkouts))]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with b.stack:
        b.setup({n: src.resolve() for n, src in zip(names, args.checkouts, strict=True)}, passthrough=False)
        for name in names:  # warm-up
            b.wrk(b.url(name, False), 64, 2)
            b.sse(b.url(name, True), 50, 20, 5, 1)
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            print(f"repeat {r + 1}/{args.repeats}", flush=True)
            for name in order:
                pid = b.services[name].pid
                add = results.setdefault(name, {})
                add.setdefault("throughput", []).append(b.observe(pid, lambda n=name: b.wrk(b.url(n, False), 64, args.seconds)))
                add.setdefault("latency8", []).append(b.observe(pid, lambda n=name: b.wrk(b.url(n, False), 8, args.seconds)))
                add.setdefault("rate100", []).append(b.observe(pid, lambda n=name: b.openloop(b.url(n, False), 100, args.seconds)))
                scenarios = ["sse_small", "sse_large"] if args.sse_large else ["sse_small"]
                for scenario in scenarios:
                    streams, events, interval = SSE_SCENARIOS[scenario]
                    run = b.observe(pid, lambda n=name, s=streams, e=events, i=interval: b.sse(b.url(n, True), s, e, i, 1))
                    run["_cpu_per_k"] = run["_proxy_cpu_s"] * 1e6 / run["events_received"] if run["events_received"] else None
                    if run["events_lost"] or run["events_merged"] or run["streams_wrong_content"]:
                        print(f"  {name} {scenario}: lost {run['events_lost']} merged {run['events_merged']}", flush=True)
                    add.setdefault(scenario, []).append(run)
                print(f"  {name}: {add['throughput'][-1]['rps']:.0f} req/s, SSE {add['sse_small'][-1]['_cpu_per_k']:.1f} ms/1k events", flush=True)
    base = names[0]
    head = "| measure | " + " | ".join(f"{n} ({src})" for n, src in zip(names, args.checkouts, strict=True)) + " | " + \
        " | ".join(f"{n} ÷ gw0" for n in names[1:]) + " |"
    print("\n" + head)
    print("|---|" + "---:|" * (2 * len(names) - 1))
    for label, scenario, key, scale in ROWS:
        if scenario not in results[base]:
            continue
        values = [median_of(results[n][scenario], key, scale) for n in names]
        noise = [spread([r.get(key) for r in results[n][scenario]]) for n in names]
        cells = [f"{v:,.2f} (±{(z or 0) * 50:.0f} %)" if v is not None else "—" for v, z in zip(values, noise, strict=True)]
        ratios = [f"{v / values[0]:.2f}×" if v is not None and values[0] else "—" for v in values[1:]]
        print(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    foreign = [r["_core0_foreign"] for n in names for runs in results[n].values() for r in runs]
    print(f"\ncore 0 taken by others: median {median(foreign) * 100:.1f} %, max {max(foreign) * 100:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
