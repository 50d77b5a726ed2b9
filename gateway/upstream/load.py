"""The servers' own load, scraped off the request path from their Prometheus page.

For each model with `metrics_path`, every upstream's `<root><metrics_path>` is read every
`load_poll_interval` seconds by one background task (never by a request). The names are those of
the engine that answers, recognised from the page itself:

| engine | waiting | running | KV cache in use (0-1) |
|---|---|---|---|
| vLLM | `vllm:num_requests_waiting` | `vllm:num_requests_running` | `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before v0.10) |
| SGLang | `sglang:num_queue_reqs` | `sglang:num_running_reqs` | `sglang:token_usage` |
| TGI | `tgi_queue_size` | `tgi_batch_current_size` | — |

A metric with several series (one per engine or model name) is summed; the KV usage is their
mean. A page that times out, is not a page of numbers, or lacks a waiting and a running count
leaves the upstream on local load (this replica's requests in flight): the failure is logged at
most once a minute per upstream, and `liutong_upstream_load_source{model,upstream}` is 1 while
the upstream's scraped load is in use, 0 while local load is (always 0 without `metrics_path`).
A sample is used for 3 poll intervals, then it is stale and local load is used again.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.upstream.pool import Pool, Upstream

log = structlog.get_logger("liutong.upstream")

MAX_PAGE_BYTES = 4 * 1024 * 1024
STALE_AFTER_POLLS = 3
LOG_EVERY_SECONDS = 60.0

# engine → (waiting, running, kv usage) metric names, each a tuple of accepted spellings
ENGINE_METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "vllm": (("vllm:num_requests_waiting",), ("vllm:num_requests_running",),
             ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    "sglang": (("sglang:num_queue_reqs",), ("sglang:num_running_reqs",), ("sglang:token_usage",)),
    "tgi": (("tgi_queue_size",), ("tgi_batch_current_size",), ()),
}  # fmt: skip
_WANTED = {name: (engine, slot) for engine, names in ENGINE_METRICS.items()
           for slot, spellings in enumerate(names) for name in spellings}  # fmt: skip


class LoadPageError(ValueError):
    """The page is not usable: the message says why (it is logged)."""


@dataclass(frozen=True, slots=True)
class LoadSample:
    waiting: float
    running: float
    kv_usage: float  # 0-1; 0 when the engine does not say
    at: float  # the pool's clock when it was taken
    outstanding: int  # this replica's requests in flight to the upstream when it was taken


def parse_load(text: str) -> tuple[float, float, float]:
    """(waiting, running, kv usage) from a Prometheus text page; `LoadPageError` if it has none."""
    sums: dict[str, list[float]] = {}  # engine → [waiting, running, kv sum, kv series]
    seen: dict[str, set[int]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        cut = line.find("{")
        space = line.find(" ")
        if space < 0:
            continue
        name = line[:cut] if 0 <= cut < space else line[:space]
        wanted = _WANTED.get(name)
        if wanted is None:
            continue
        engine, slot = wanted
        fields = line[line.rfind("}") + 1 :].split() if cut >= 0 else line[space:].split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            raise LoadPageError(f"{name}: not a number") from None
        if not math.isfinite(value) or value < 0:
            raise LoadPageError(f"{name}: {fields[0]} is not a load")
        acc = sums.setdefault(engine, [0.0, 0.0, 0.0, 0.0])
        seen.setdefault(engine, set()).add(slot)
        if slot == 2:
            acc[2] += value
            acc[3] += 1
        else:
            acc[slot] += value
    for engine, slots in seen.items():
        if 0 in slots and 1 in slots:
            waiting, running, kv_sum, kv_series = sums[engine]
            return waiting, running, min(1.0, kv_sum / kv_series) if kv_series else 0.0
    raise LoadPageError("no waiting and running counts of vLLM, SGLang or TGI on the page")


async def scrape(pool: Pool, upstream: Upstream, session: aiohttp.ClientSession) -> None:
    """Read one upstream's page; on success its `load` is the new sample, on failure it stays."""
    route = pool.route
    assert route.metrics_path is not None  # type narrowing: only pools with a metrics_path are polled
    timeout = aiohttp.ClientTimeout(total=max(0.2, min(2.0, route.load_poll_interval * 2)))
    outstanding = upstream.outstanding
    try:
        async with session.get(upstream.root + route.metrics_path, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise LoadPageError(f"HTTP {resp.status}")
            body = await resp.content.read(MAX_PAGE_BYTES + 1)
        if len(body) > MAX_PAGE_BYTES:
            raise LoadPageError(f"the page is over {MAX_PAGE_BYTES} bytes")
        waiting, running, kv = parse_load(body.decode("utf-8", "replace"))
    except (aiohttp.ClientError, TimeoutError, LoadPageError) as exc:
        now = pool.clock()
        if now - upstream.load_logged_at >= LOG_EVERY_SECONDS:
            upstream.load_logged_at = now
            reason = str(exc) if isinstance(exc, LoadPageError) else type(exc).__name__
            log.warning("upstream_load_scrape_failed", model=route.name, upstream=upstream.root, reason=reason,
                        message="Routing on this replica's own load for this upstream until its metrics answer.")  # fmt: skip
        return
    upstream.load = LoadSample(waiting, running, kv, pool.clock(), outstanding)


def scraped(pool: Pool, upstream: Upstream, now: float) -> LoadSample | None:
    """The upstream's sample while it is fresh, else None (local load)."""
    sample = upstream.load
    if sample is None or pool.route.metrics_path is None:
        return None
    if now - sample.at > STALE_AFTER_POLLS * pool.route.load_poll_interval:
        return None
    return sample


async def run_load_polls(pools: Callable[[], Mapping[str, Pool]], session: aiohttp.ClientSession) -> None:
    """Scrape every upstream of every pool that has a `metrics_path`, each on its model's interval."""
    due: dict[int, float] = {}
    running: dict[int, asyncio.Task[None]] = {}
    loop = asyncio.get_running_loop()
    try:
        while True:
            now = loop.time()
            tick = 0.25
            live: set[int] = set()
            for pool in pools().values():
                if pool.route.metrics_path is None:
                    continue
                tick = min(tick, pool.route.load_poll_interval)
                for upstream in pool.upstreams:
                    key = id(upstream)
                    live.add(key)
                    if due.get(key, 0.0) > now or key in running:
                        continue
                    due[key] = now + pool.route.load_poll_interval
                    task = loop.create_task(scrape(pool, upstream, session))
                    running[key] = task
                    task.add_done_callback(lambda _, key=key: running.pop(key, None))  # type: ignore[misc]
            if len(due) > 2 * len(live):  # upstreams of pools replaced by a reload
                due = {key: due[key] for key in live if key in due}
            await asyncio.sleep(tick)
    finally:
        for task in running.values():
            task.cancel()


def export_load_sources(metrics: Metrics, pools: Mapping[str, Pool], now: float) -> None:
    """`liutong_upstream_load_source`: 1 while an upstream's scraped load is used, 0 for local load."""
    for name, pool in pools.items():
        for upstream in pool.upstreams:
            source = 1 if scraped(pool, upstream, now) is not None else 0
            metrics.child(metrics.upstream_load_source, name, upstream.root).set(source)  # type: ignore[attr-defined]
