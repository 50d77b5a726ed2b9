"""Upstream pools: round robin, retries before the first byte, outlier ejection and recovery."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from gateway.config import HealthCheck, ModelRoute, Timeouts
from gateway.upstream.pool import EJECT_AFTER_FAILURES, EJECT_SECONDS, Pool
from tests.conftest import SEED_MODELS, auth, chat_body, free_port, gateway_settings

CHAT = "/v1/chat/completions"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pool(*roots: str, clock: FakeClock) -> Pool:
    return Pool(ModelRoute("m", tuple(roots), Timeouts()), clock)


def test_round_robin_and_ejection_with_recovery():
    clock = FakeClock()
    pool = _pool("http://a", "http://b", "http://c", clock=clock)
    assert [pool.pick().root for _ in range(6)] == ["http://a", "http://b", "http://c"] * 2
    b = pool.upstreams[1]
    for _ in range(EJECT_AFTER_FAILURES):
        pool.failed(b)
    assert [pool.pick().root for _ in range(4)] == ["http://a", "http://c", "http://a", "http://c"]
    clock.now += EJECT_SECONDS
    assert "http://b" in {pool.pick().root for _ in range(3)}  # back for a probe
    pool.succeeded(b)
    assert b.failures == 0 and pool.healthy()


def test_a_fully_ejected_pool_still_offers_the_earliest_to_recover():
    clock = FakeClock()
    pool = _pool("http://a", "http://b", clock=clock)
    for upstream in pool.upstreams:
        for _ in range(EJECT_AFTER_FAILURES):
            pool.failed(upstream)
        clock.now += 1
    assert not pool.healthy()
    assert pool.pick().root == "http://a"
    assert pool.pick(avoid=[pool.upstreams[0]]).root == "http://b"


async def test_a_refused_connection_is_retried_on_another_upstream(make_gateway, mock_upstream, redis_url, http):
    dead = f"http://127.0.0.1:{free_port()}"
    settings = gateway_settings(mock_upstream, redis_url)
    models = {m: ModelRoute(m, (dead, mock_upstream), settings.timeouts) for m in SEED_MODELS}
    gateway = await make_gateway(settings=settings.__class__(**{**_fields(settings), "models": models}))
    key, _ = await gateway.create_key()
    for stream in (False, True) * 5:
        async with http.post(gateway.url + CHAT, json=chat_body(stream=stream), headers=auth(key)) as resp:
            assert resp.status == 200
            await resp.read()
    stats = await gateway.mock_stats()
    assert stats["requests"] == 10  # every request reached the live upstream exactly once
    async with http.get(gateway.url + "/metrics") as resp:
        text = await resp.text()
    # The dead upstream failed 5 times, was ejected, and was not tried again.
    assert 'liutong_upstream_errors_total{model="crimson-falcon-4",reason="connect"} 5.0' in text
    assert f'liutong_upstream_healthy{{model="crimson-falcon-4",upstream="{dead}"}} 0.0' in text


async def test_no_upstream_answering_is_a_502(make_gateway, redis_url, http):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    settings = gateway_settings(dead[0], redis_url)
    models = {m: ModelRoute(m, tuple(dead), settings.timeouts) for m in SEED_MODELS}
    gateway = await make_gateway(settings=settings.__class__(**{**_fields(settings), "models": models}))
    key, _ = await gateway.create_key()
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["code"] == "upstream_unavailable"


async def test_a_503_is_retried_once_per_other_upstream_then_passed_through(make_gateway, mock_upstream, redis_url,
                                                                           http):  # fmt: skip
    settings = gateway_settings(mock_upstream, redis_url)
    alias = mock_upstream.replace("127.0.0.1", "localhost")
    models = {m: ModelRoute(m, (mock_upstream, alias), settings.timeouts) for m in SEED_MODELS}
    gateway = await make_gateway(settings=settings.__class__(**{**_fields(settings), "models": models}))
    key, _ = await gateway.create_key()
    async with http.post(gateway.url + CHAT, json=chat_body(),
                         headers={**auth(key), "x-mock-status": "503"}) as resp:  # fmt: skip
        assert resp.status == 503
        body = await resp.json()
    assert body["error"]["type"] != "upstream_error" or body["error"].get("code") != "no_healthy_upstream"
    assert (await gateway.mock_stats())["requests"] == 2  # tried both upstreams, no more


def _fields(settings):
    from dataclasses import fields

    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def _weighted(clock: FakeClock, weights: tuple[int, ...], limits: tuple[int, ...] = ()) -> Pool:
    roots = tuple(f"http://u{i}" for i in range(len(weights)))
    return Pool(ModelRoute("m", roots, Timeouts(), weights=weights, max_connections=limits), clock)


def test_idle_traffic_follows_the_weights():
    pool = _weighted(FakeClock(), (3, 1))
    picks = [pool.pick().root for _ in range(40)]
    assert picks.count("http://u0") == 30 and picks.count("http://u1") == 10


def test_least_outstanding_wins_and_full_upstreams_are_skipped():
    from gateway.errors import NoHealthyUpstream

    pool = _weighted(FakeClock(), (1, 1), limits=(2, 1))
    a, b = pool.upstreams
    a.outstanding = 1
    assert pool.pick() is b
    b.outstanding = 1  # b is at its limit of 1
    assert pool.pick() is a
    a.outstanding = 2
    with pytest.raises(NoHealthyUpstream):
        pool.pick()


async def test_active_health_checks_take_an_upstream_out_and_back(make_gateway, mock_upstream, redis_url, http):
    healthy = {"ok": False}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy["ok"] else 500)

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "should not be routed here"}}, status=500)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    sick = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        settings = gateway_settings(mock_upstream, redis_url)
        check = HealthCheck(path="/health", interval=0.1, timeout=1, unhealthy_after=1, healthy_after=1)
        models = {m: ModelRoute(m, (sick, mock_upstream), settings.timeouts, health_check=check)
                  for m in SEED_MODELS}  # fmt: skip
        gateway = await make_gateway(settings=settings.__class__(**{**_fields(settings), "models": models}))
        key, _ = await gateway.create_key()
        pool = gateway.state.pools["crimson-falcon-4"]
        for _ in range(50):
            if not pool.upstreams[0].check_healthy:
                break
            await asyncio.sleep(0.05)
        assert not pool.upstreams[0].check_healthy
        for _ in range(6):
            async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
                assert resp.status == 200
        healthy["ok"] = True
        for _ in range(50):
            if pool.upstreams[0].check_healthy:
                break
            await asyncio.sleep(0.05)
        assert pool.upstreams[0].check_healthy
    finally:
        await runner.cleanup()


async def test_an_upstream_that_never_accepts_times_out_on_connect_and_is_retried(
    make_gateway, mock_upstream, redis_url, http
):
    """A listener whose accept queue is full drops SYNs: the TCP connect hangs. `connect` bounds
    it (timed by aiohttp for new connections only), and the request goes to the next upstream."""
    import socket

    clogged = socket.socket()
    clogged.bind(("127.0.0.1", 0))
    clogged.listen(0)
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; later connects to it get no SYN-ACK
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(clogged.getsockname())
            fillers.append(filler)
        await asyncio.sleep(0.1)
        stuck = f"http://127.0.0.1:{clogged.getsockname()[1]}"
        settings = gateway_settings(mock_upstream, redis_url)
        timeouts = Timeouts(connect=0.3, first_byte=10, idle=10, total=30)
        models = {m: ModelRoute(m, (stuck, mock_upstream), timeouts) for m in SEED_MODELS}
        gateway = await make_gateway(settings=settings.__class__(**{**_fields(settings), "models": models}))
        key, _ = await gateway.create_key()
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
            assert resp.status == 200, await resp.text()
        assert 0.25 <= loop.time() - started < 3
        only_stuck = {m: ModelRoute(m, (stuck,), timeouts) for m in SEED_MODELS}
        alone = await make_gateway(settings=settings.__class__(**{**_fields(settings), "models": only_stuck}))
        key, _ = await alone.create_key()
        async with http.post(alone.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    finally:
        for filler in fillers:
            filler.close()
        clogged.close()
