"""The simulator's `/metrics`: vLLM's own metric names, in the Prometheus text format.

Gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
(held blocks over `--kv-blocks`, 0 to 1 as in vLLM V1); counters `vllm:prefix_cache_queries_total`
and `vllm:prefix_cache_hits_total` (in tokens), `vllm:prompt_tokens_total`,
`vllm:generation_tokens_total`, `vllm:request_success_total`; histograms
`vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds` and
`vllm:iteration_tokens_total` (tokens per step). The step duration has no vLLM name; it is
`vllm:sim_step_duration_seconds`. Every time is model time (wall time × `--time-scale`), and every
series carries `model_name` as vLLM's do. Rendered by hand: the simulator needs no registry.
"""

from __future__ import annotations

import bisect
from typing import Final

from gateway.sim.engine import Engine, SimRequest, Step

TIME_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TOKEN_BUCKETS: Final = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{self.name}_bucket{{{labels},le="{le}"}} {total}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.sum!r}")
        lines.append(f"{self.name}_count{{{labels}}} {self.count}")
        return lines


class SimMetrics:
    """Counts what the engine does (a step listener) and renders it with the engine's gauges."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = 0
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (model seconds).", TIME_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency (model seconds).",
                             TIME_BUCKETS)  # fmt: skip
        self.step_tokens = Histogram("vllm:iteration_tokens_total", "Tokens per engine step.", TOKEN_BUCKETS)
        self.step_time = Histogram("vllm:sim_step_duration_seconds", "Engine step duration (model seconds).",
                                   TIME_BUCKETS)  # fmt: skip
        engine.listeners.append(self.on_step)

    def on_step(self, step: Step, first: list[SimRequest], done: list[SimRequest]) -> None:
        self.step_tokens.observe(step.prefill_tokens + len(step.decode))
        self.step_time.observe(step.seconds)
        self.generation_tokens += len(first) + len(step.decode)
        for request in first:
            self.prompt_tokens += request.prompt_tokens
            if request.first_token_at is not None:
                self.ttft.observe(request.first_token_at - request.arrived)
        for request in done:
            self.success += 1
            if request.finished_at is not None:
                self.e2e.observe(request.finished_at - request.arrived)

    def render(self) -> bytes:
        engine = self.engine
        name = engine.config.model_name.replace("\\", "\\\\").replace('"', '\\"')
        labels = f'model_name="{name}"'
        lines: list[str] = []

        def scalar(metric: str, kind: str, help_: str, value: float) -> None:
            lines.extend((f"# HELP {metric} {help_}", f"# TYPE {metric} {kind}", f"{metric}{{{labels}}} {value!r}"))

        scalar("vllm:num_requests_running", "gauge", "Requests in the running batch.", len(engine.running))
        scalar("vllm:num_requests_waiting", "gauge", "Requests waiting to be admitted.", len(engine.waiting))
        scalar("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks held (0-1).", engine.cache.usage)
        scalar("vllm:prefix_cache_queries_total", "counter", "Prompt tokens queried in the prefix cache.",
               engine.cache.queries)  # fmt: skip
        scalar("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", engine.cache.hits)
        scalar("vllm:prompt_tokens_total", "counter", "Prompt tokens prefilled or cached.", self.prompt_tokens)
        scalar("vllm:generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        scalar("vllm:request_success_total", "counter", "Requests finished.", self.success)
        for histogram in (self.ttft, self.e2e, self.step_tokens, self.step_time):
            lines.extend(histogram.render(labels))
        return ("\n".join(lines) + "\n").encode()
