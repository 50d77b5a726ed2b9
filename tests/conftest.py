"""Fixtures with real parts: a `redis-server` process on a free port, the mock upstream as a real
server on port 0, and the gateway itself on port 0 (in-process, or as a subprocess where
signals matter). Nothing here touches the Redis on 6379 or any address but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
import redis
from aiohttp import web

from gateway.app import create_app
from gateway.config import Limits, ModelRoute, Settings, Timeouts
from gateway.keys.records import KeyRecord
from gateway.mock.server import start_mock_upstream
from gateway.state import STATE, AppState

SEED_MODELS = ("crimson-falcon-4", "indigo-owl-4", "amber-phoenix-4")

# Generation speed depends on what else the machine runs: never fail a property on slowness.
hypothesis.settings.register_profile(
    "liutong", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("liutong")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real `redis-server` on a free loopback port, that a test may stop and start again."""

    def __init__(self, *, persistent: bool = False) -> None:
        # persistent: an append-only file (fsync always), so that data survives stop()/start().
        self.persistent = persistent
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `bash scripts/test.sh` (it installs it)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lt-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
             "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def mock_upstream() -> AsyncIterator[str]:
    runner, port = await start_mock_upstream("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@dataclass
class Gateway:
    """A running gateway: its URL, its services, and helpers to make keys and calls."""

    url: str
    state: AppState
    upstream: str

    async def create_key(self, name: str = "test", **options: Any) -> tuple[str, KeyRecord]:
        return await self.state.keys.create(name, **options)

    async def mock_stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.upstream + "/mock/stats") as resp:
            return await resp.json()  # type: ignore[no-any-return]

    async def settled(self, timeout: float = 5.0) -> None:
        """Wait until the usage writer has settled every finished request in the store."""
        deadline = time.monotonic() + timeout
        while self.state.usage.pending or self.state.inflight:
            if time.monotonic() > deadline:
                raise AssertionError("usage writer did not drain")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)


def gateway_settings(upstream: str, redis_url: str | None, **overrides: Any) -> Settings:
    timeouts = overrides.pop("timeouts", Timeouts(connect=2, first_byte=10, idle=10, total=30))
    models = {m: ModelRoute(name=m, upstreams=(upstream,), timeouts=timeouts) for m in SEED_MODELS}
    base = Settings(
        redis_url=redis_url,
        models=models,
        limits=overrides.pop("limits", Limits(rpm=10_000, tpm=10_000_000, max_concurrent=1000)),
        timeouts=timeouts,
    )
    return replace(base, **overrides)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(mock_upstream: str, redis_url: str) -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []

    async def factory(settings: Settings | None = None, **overrides: Any) -> Gateway:
        settings = settings or gateway_settings(mock_upstream, redis_url, **overrides)
        app = create_app(settings)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return Gateway(f"http://127.0.0.1:{port}", app[STATE], mock_upstream)

    yield factory
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


@pytest.fixture
async def key(gateway: Gateway) -> str:
    plaintext, _ = await gateway.create_key("default")
    return plaintext


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat_body(model: str = "crimson-falcon-4", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello!"}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_gateway_config(path: Path, redis_url: str, upstream: str, **extra: Any) -> Path:
    """A config file for `serve`: the seed models on `upstream`, the store at `redis_url`."""
    import yaml

    tree = {"redis_url": redis_url, "models": {m: {"upstreams": [upstream]} for m in SEED_MODELS}, **extra}
    path.write_text(yaml.safe_dump(tree))
    return path


async def create_key_in(redis_url: str, name: str = "test", **options: Any) -> str:
    """A new key in the store at `redis_url` (for gateways running as subprocesses)."""
    from gateway.keys.records import KeyService
    from gateway.store.client import open_store

    store = open_store(redis_url)
    try:
        plaintext, _ = await KeyService(store.redis).create(name, **options)
    finally:
        await store.close()
    return plaintext


class GatewayProcess:
    """`python -m gateway serve` as a subprocess (for signals, several replicas, the CLI)."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="lt-gw-")) / "stdout.log"
        self.err_path = self.log_path.with_name("stderr.log")

    def start(self, timeout: float = 15.0) -> None:
        with open(self.log_path, "ab") as out, open(self.err_path, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=err, env=self.env, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.err_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
        code = self.process.wait(timeout=40)
        self.process = None
        return code

    def logs(self) -> str:
        return self.log_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()
