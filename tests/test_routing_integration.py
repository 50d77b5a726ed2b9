"""Routing with real upstream processes (`liutong-gateway mock-upstream`): prefix_affinity keeps a
conversation's turns on one server where round_robin scatters them; two gateway replicas agree;
an upstream that dies moves only its own conversations; SIGHUP switches a model's routing."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
import pytest
import yaml

from gateway.config import ModelRoute
from tests.conftest import REPO, GatewayProcess, create_key_in, free_port, gateway_settings

MODEL = "crimson-falcon-4"
SYSTEM = " ".join(f"policy{i}" for i in range(120))


def _start_mock() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "mock-upstream", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("mock upstream did not start")


@pytest.fixture
def upstreams() -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    started = [_start_mock() for _ in range(3)]
    yield started
    for process, _ in started:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=10)


def turn_messages(c: int, t: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(t + 1):
        messages.append({"role": "user", "content": f"conversation {c} question {i} " + "tell me more " * 8})
        if i < t:
            messages.append({"role": "assistant", "content": f"reply {i} to {c} " + "it depends " * 12})
    return messages


async def _served_by(session: aiohttp.ClientSession, roots: list[str]) -> dict[str, str]:
    """request id → the upstream whose mock saw it."""
    seen = {}
    for root in roots:
        async with session.get(root + "/mock/stats") as resp:
            for record in (await resp.json())["records"]:
                seen[record["request_id"]] = root
    return seen


async def _converse(session, gateway_urls, key, conversations=10, turns=4) -> dict[int, list[str]]:
    """Every conversation turn by turn, through the replicas in turn; request ids. (A count of
    conversations not a multiple of the upstreams, so that round robin does not line up by chance.)"""
    ids: dict[int, list[str]] = {c: [] for c in range(conversations)}
    for t in range(turns):
        for c in range(conversations):
            url = gateway_urls[(c + t) % len(gateway_urls)]
            body = {"model": MODEL, "messages": turn_messages(c, t), "max_tokens": 4}
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
                assert resp.status == 200, await resp.text()
                ids[c].append(resp.headers["x-request-id"])
    return ids


def _reuse(ids: dict[int, list[str]], served: dict[str, str]) -> float:
    """The share of later turns sent where the conversation's previous turn went (prefix reusable)."""
    same = total = 0
    for turns in ids.values():
        for before, after in itertools.pairwise(turns):
            total += 1
            same += served[before] == served[after]
    return same / total


async def _gateway(make_gateway, redis_url, roots, routing):
    settings = gateway_settings(roots[0], redis_url)
    models = dict(settings.models)
    models[MODEL] = ModelRoute(MODEL, tuple(roots), settings.timeouts, routing=routing)
    return await make_gateway(settings=dataclasses.replace(settings, models=models))


async def test_prefix_affinity_keeps_conversations_together_where_round_robin_scatters(
    make_gateway, redis_url, upstreams, http
):
    roots = [root for _, root in upstreams]
    affinity = await _gateway(make_gateway, redis_url, roots, "prefix_affinity")
    spread = await _gateway(make_gateway, redis_url, roots, "round_robin")
    key, _ = await affinity.create_key()
    a_ids = await _converse(http, [affinity.url], key)
    r_ids = await _converse(http, [spread.url], key)
    served = await _served_by(http, roots)
    assert _reuse(a_ids, served) == 1.0
    assert _reuse(r_ids, served) < 0.5  # 3 upstreams in turn: a conversation's next turn lands elsewhere
    homes = {served[turns[0]] for turns in a_ids.values()}
    assert len(homes) >= 2  # conversations still spread over the pool


async def test_two_replicas_send_a_conversation_to_the_same_upstream(make_gateway, redis_url, upstreams, http):
    roots = [root for _, root in upstreams]
    one = await _gateway(make_gateway, redis_url, roots, "prefix_affinity")
    two = await _gateway(make_gateway, redis_url, roots, "prefix_affinity")
    key, _ = await one.create_key()
    ids = await _converse(http, [one.url, two.url], key)  # turns alternate between the replicas
    assert _reuse(ids, await _served_by(http, roots)) == 1.0


async def test_an_upstream_that_dies_moves_only_its_own_conversations(make_gateway, redis_url, upstreams, http):
    roots = [root for _, root in upstreams]
    gateway = await _gateway(make_gateway, redis_url, roots, "prefix_affinity")
    key, _ = await gateway.create_key()
    before_ids = await _converse(http, [gateway.url], key, turns=2)
    served = await _served_by(http, roots)
    home = {c: served[turns[-1]] for c, turns in before_ids.items()}
    victim_process, victim = next((p, r) for p, r in upstreams if r in home.values())
    victim_process.terminate()
    victim_process.wait(timeout=10)
    after: dict[int, str] = {}
    for c in home:  # the next turn: refused by the dead one, retried on another before the first byte
        body = {"model": MODEL, "messages": turn_messages(c, 2), "max_tokens": 4}
        async with http.post(gateway.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            assert resp.status == 200
            after[c] = resp.headers["x-request-id"]
    served = await _served_by(http, [r for r in roots if r != victim])
    for c, was in home.items():
        if was == victim:
            assert served[after[c]] != victim
        else:
            assert served[after[c]] == was  # untouched


async def test_sighup_switches_routing_and_two_processes_agree(tmp_path, redis_url, upstreams):
    roots = [root for _, root in upstreams]
    config = tmp_path / "gw.yaml"

    def write(routing: str) -> None:
        tree = {"redis_url": redis_url, "usage_spool_path": str(tmp_path / f"spool-{routing}"),
                "models": {MODEL: {"upstreams": roots, "routing": routing}}}  # fmt: skip
        config.write_text(yaml.safe_dump(tree))

    write("prefix_affinity")
    replicas = [GatewayProcess(config), GatewayProcess(config)]
    key = await create_key_in(redis_url)
    try:
        for replica in replicas:
            replica.start()
        async with aiohttp.ClientSession() as http:
            ids = await _converse(http, [r.url for r in replicas], key, conversations=7, turns=3)
            assert _reuse(ids, await _served_by(http, roots)) == 1.0
            write("round_robin")
            for replica in replicas:
                assert replica.process is not None
                replica.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            assert all("reloaded" in r.logs() for r in replicas)
            ids = await _converse(http, [replicas[0].url], key, conversations=7, turns=3)
            assert _reuse(ids, await _served_by(http, roots)) < 0.5
            write("sticky")  # a bad value: the old config stays
            replicas[0].process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            await asyncio.sleep(1.0)
            assert "models.crimson-falcon-4.routing" in replicas[0].logs()
    finally:
        for replica in replicas:
            replica.stop()
