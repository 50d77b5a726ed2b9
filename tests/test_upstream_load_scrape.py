"""Scraping the servers' load: vLLM, SGLang and TGI pages parsed; a page that times out, is garbage,
lacks the names or errs falls back to local load, logged once a minute, shown in
`liutong_upstream_load_source`. Every page is served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.config import ModelRoute, Timeouts
from gateway.metrics import Metrics
from gateway.upstream.load import LoadPageError, export_load_sources, parse_load, scrape, scraped
from gateway.upstream.pool import Pool
from tests.conftest import SEED_MODELS, gateway_settings

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1234.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 99
"""
SGLANG = """sglang:num_running_reqs{model_name="m"} 7
sglang:num_queue_reqs{model_name="m"} 2
sglang:token_usage{model_name="m"} 0.25
"""
TGI = "tgi_queue_size 6\ntgi_batch_current_size 9\ntgi_request_count 100\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pages_of_each_engine_are_read():
    assert parse_load(VLLM) == (5.0, 5.0, pytest.approx(0.6))
    assert parse_load(SGLANG) == (2.0, 7.0, 0.25)
    assert parse_load(TGI) == (6.0, 9.0, 0.0)
    assert parse_load("vllm:num_requests_waiting 1 1700000000000\nvllm:num_requests_running 2\n") == (1.0, 2.0, 0.0)


@pytest.mark.parametrize(
    "page",
    [
        "",
        "<html><body>Not Found</body></html>",
        "\x00\xff garbage " * 100,
        "process_cpu_seconds_total 12\nhttp_requests_total 5\n",  # no engine names
        "vllm:num_requests_waiting 3\n",  # waiting without running
        "vllm:num_requests_waiting abc\nvllm:num_requests_running 1\n",
        "vllm:num_requests_waiting NaN\nvllm:num_requests_running 1\n",
        "vllm:num_requests_waiting -4\nvllm:num_requests_running 1\n",
        "vllm:num_requests_waiting{\nvllm:num_requests_running 1\n",
    ],
)
def test_a_page_without_usable_load_is_refused(page):
    with pytest.raises(LoadPageError):
        parse_load(page)


class MetricsServer:
    """A real HTTP server whose /metrics answers what the test says."""

    def __init__(self) -> None:
        self.body = VLLM
        self.status = 200
        self.delay = 0.0
        self.hits = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text=self.body)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"


@pytest.fixture
async def server():
    s = MetricsServer()
    s.url = await s.start()
    yield s
    await s.runner.cleanup()


def _pool(root: str, clock: FakeClock, interval: float = 0.1) -> Pool:
    route = ModelRoute("m", (root,), Timeouts(), metrics_path="/metrics", load_poll_interval=interval)
    return Pool(route, clock)


async def test_scrape_faults_fall_back_to_local_load_and_log_once_a_minute(server):
    clock = FakeClock()
    pool = _pool(server.url, clock)
    upstream = pool.upstreams[0]
    metrics = Metrics(["m"])
    async with aiohttp.ClientSession() as session:
        await scrape(pool, upstream, session)
        assert scraped(pool, upstream, clock.now) == upstream.load
        assert (upstream.load.waiting, upstream.load.running) == (5.0, 5.0)
        export_load_sources(metrics, {"m": pool}, clock.now)
        assert (
            metrics.registry.get_sample_value("liutong_upstream_load_source", {"model": "m", "upstream": server.url})
            == 1
        )

        faults = [("garbage", lambda: setattr(server, "body", "<<<not metrics>>>")),
                  ("names", lambda: setattr(server, "body", "up 1\n")),
                  ("status", lambda: setattr(server, "status", 500)),
                  ("timeout", lambda: setattr(server, "delay", 1.0))]  # fmt: skip
        with capture_logs() as logs:
            for _, fault in faults:
                fault()
                good = upstream.load
                await scrape(pool, upstream, session)
                assert upstream.load is good  # the last good sample stays until it is stale
            clock.now += 0.31  # over 3 polls of 0.1 s: stale
            assert scraped(pool, upstream, clock.now) is None
            export_load_sources(metrics, {"m": pool}, clock.now)
            assert (
                metrics.registry.get_sample_value(
                    "liutong_upstream_load_source", {"model": "m", "upstream": server.url}
                )
                == 0
            )
            failures = [e for e in logs if e["event"] == "upstream_load_scrape_failed"]
            assert (
                len(failures) == 1
                and failures[0]["reason"] == "no waiting and running counts of vLLM, SGLang or TGI on the page"
            )
            assert "prompt" not in str(failures[0])
            clock.now += 60
            await scrape(pool, upstream, session)  # still timing out: logged again a minute later
            failures = [e for e in logs if e["event"] == "upstream_load_scrape_failed"]
            assert len(failures) == 2 and failures[1]["reason"] == "TimeoutError"
        server.delay, server.status, server.body = 0.0, 200, TGI
        await scrape(pool, upstream, session)
        assert scraped(pool, upstream, clock.now) is not None and upstream.load.waiting == 6.0


async def test_an_unreachable_metrics_page_is_local_load(unused_tcp_port):
    clock = FakeClock()
    pool = _pool(f"http://127.0.0.1:{unused_tcp_port}", clock)
    async with aiohttp.ClientSession() as session:
        await scrape(pool, pool.upstreams[0], session)
    assert pool.upstreams[0].load is None and scraped(pool, pool.upstreams[0], clock.now) is None


async def test_the_gateway_polls_off_the_request_path_and_exports_the_source(
    make_gateway, mock_upstream, redis_url, server, http
):
    """One upstream with a vLLM page, one (the mock) without /metrics: 1 and 0."""
    settings = gateway_settings(mock_upstream, redis_url)
    route = ModelRoute("crimson-falcon-4", (server.url, mock_upstream), settings.timeouts,
                       metrics_path="/metrics", load_poll_interval=0.05)  # fmt: skip
    models = {**{m: r for m, r in settings.models.items() if m in SEED_MODELS}, "crimson-falcon-4": route}
    gateway = await make_gateway(settings=dataclasses.replace(settings, models=models))
    pool = gateway.state.pools["crimson-falcon-4"]
    for _ in range(100):
        if server.hits >= 3:
            break
        await asyncio.sleep(0.02)
    assert server.hits >= 3  # polled on its interval with no request sent
    assert pool.upstreams[0].load is not None and pool.upstreams[1].load is None
    async with http.get(gateway.url + "/metrics") as resp:
        text = await resp.text()
    assert f'liutong_upstream_load_source{{model="crimson-falcon-4",upstream="{server.url}"}} 1.0' in text
    assert f'liutong_upstream_load_source{{model="crimson-falcon-4",upstream="{mock_upstream}"}} 0.0' in text
    assert 'liutong_upstream_load_source{model="indigo-owl-4"' in text
