"""`serve --workers N`: processes sharing one port, with /metrics adding up across them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp

from tests.conftest import REPO, auth, chat_body, create_key_in, free_port, write_gateway_config

pytestmark = __import__("pytest").mark.integration


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the gateway exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the gateway did not start")


async def test_two_workers_share_the_port_and_sum_their_metrics(tmp_path, redis_url, mock_upstream):
    port = free_port()
    config = write_gateway_config(tmp_path / "gw.yaml", redis_url, mock_upstream,
                                  limits={"default": {"rpm": 100000, "tpm": 100000000, "max_concurrent": 1000}})
    key = await create_key_in(redis_url, "workers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIUTONG_", "PROMETHEUS_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port, process)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:

            async def call() -> int:
                # A fresh connection each time, so that the kernel spreads them over both workers.
                async with http.post(url + "/v1/chat/completions", json=chat_body(),
                                     headers={**auth(key), "Connection": "close"}) as resp:  # fmt: skip
                    await resp.read()
                    return resp.status

            await asyncio.sleep(1.0)  # let the second worker bind too
            statuses = await asyncio.gather(*(call() for _ in range(40)))
            assert statuses == [200] * 40
            async with http.get(url + "/metrics") as resp:
                text = await resp.text()
        found = re.search(r'liutong_requests_total\{model="crimson-falcon-4",status="200"\} (\S+)', text)
        assert found and float(found.group(1)) == 40.0
        pids = set(re.findall(r'pid="(\d+)"', text))
        assert len(pids) <= 2
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=40)
    assert code == 0


def test_workers_need_a_shared_store():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("LIUTONG_")},
    )  # fmt: skip
    assert result.returncode == 2
    assert "redis_url" in result.stderr
