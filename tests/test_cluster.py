"""The gateway against a real Redis Cluster (3 masters, 3 replicas) and a Sentinel-managed master.

Every Redis here is a `redis-server` started on free loopback ports for this module and stopped
in its teardown: six cluster nodes joined with `redis-cli --cluster create`, and, for Sentinel,
a master, a replica and one sentinel. The gateway runs in-process (and, for the shared limit,
as four `serve` subprocesses) against `redis+cluster://` and `redis+sentinel://` URLs.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from gateway.app import create_app
from gateway.config import Limits
from gateway.state import STATE
from gateway.store.names import USAGE_STREAM, concurrency_set, key_bucket, limit_tag
from gateway.store.topology import parse_redis_url
from tests.conftest import Gateway, auth, chat_body, gateway_settings
from tests.test_replicas import Replicas, burst, refilled

pytestmark = pytest.mark.integration

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
if REDIS_SERVER is None or REDIS_CLI is None:  # pragma: no cover - scripts/test.sh installs them
    pytest.skip("redis-server and redis-cli are needed", allow_module_level=True)


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open at once while they are chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _wait(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except redis.exceptions.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Processes:
    """`redis-server` processes started by this module, each stopped (and waited for) in teardown."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lt-redis-topology-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        assert REDIS_SERVER is not None
        proc = subprocess.Popen([REDIS_SERVER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def server(self, port: int, *extra: str) -> subprocess.Popen[bytes]:
        proc = self.spawn("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.dir), "--daemonize", "no", "--loglevel", "warning",
                   "--repl-diskless-sync-delay", "0", *extra)  # fmt: skip
        _wait(lambda: redis.Redis(port=port, socket_timeout=0.2).ping(), f"redis-server on {port}")
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalCluster:
    """Six cluster nodes (3 masters with a replica each) on free ports."""

    def __init__(self, processes: Processes) -> None:
        ports = free_ports(12)
        self.ports, bus_ports = ports[:6], ports[6:]
        self.process: dict[int, subprocess.Popen[bytes]] = {}
        for port, bus in zip(self.ports, bus_ports, strict=True):
            self.process[port] = processes.server(port, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                             "--cluster-config-file", str(processes.dir / f"nodes-{port}.conf"),
                             "--cluster-node-timeout", "2000")  # fmt: skip
        assert REDIS_CLI is not None
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

        def converged() -> bool:
            for client in self.clients():
                info = client.cluster("info")
                if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != 6:
                    return False
            return True

        _wait(converged, "cluster_state:ok on every node", timeout=30)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.live()[:3])

    def live(self) -> list[int]:
        return [p for p in self.ports if self.process[p].poll() is None]

    def clients(self) -> list[redis.Redis]:
        return [redis.Redis(port=p, socket_timeout=2) for p in self.live()]

    def primaries(self) -> list[redis.Redis]:
        return [c for c in self.clients() if c.info("replication")["role"] == "master"]

    def owner(self, key: str) -> int:
        """The port of the master that serves `key`'s slot now."""
        client = self.client()
        try:
            return int(client.get_node_from_key(key).port)
        finally:
            client.close()

    def client(self) -> Any:  # redis.RedisCluster (its stubs type replies loosely)
        return redis.RedisCluster(host="127.0.0.1", port=self.live()[0])


@pytest.fixture(scope="module")
def topology() -> Iterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        processes.stop()


@pytest.fixture(scope="module")
def cluster(topology: Processes) -> LocalCluster:
    return LocalCluster(topology)


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    for client in cluster.primaries():
        client.flushall()
        client.script_flush()
    return cluster.url


@pytest.fixture
async def start_gateway(mock_upstream: str, tmp_path: Path) -> AsyncIterator[Any]:
    """`await start_gateway(redis_url, **settings)`: a gateway in-process on port 0."""
    runners: list[web.AppRunner] = []

    async def start(redis_url: str, **overrides: Any) -> Gateway:
        overrides.setdefault("usage_spool_path", str(tmp_path / f"usage-{len(runners)}.spool"))
        app = create_app(gateway_settings(mock_upstream, redis_url, **overrides))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return Gateway(f"http://127.0.0.1:{runner.addresses[0][1]}", app[STATE], mock_upstream)

    yield start
    for runner in reversed(runners):
        try:
            async with asyncio.timeout(30):
                await runner.cleanup()
        except TimeoutError:
            for task in asyncio.all_tasks():
                task.print_stack()
            raise


async def _chat(http: aiohttp.ClientSession, gw: Gateway, key: str, **extra: Any) -> tuple[int, bytes]:
    headers = {**auth(key), **extra.pop("headers", {})}
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(**extra), headers=headers) as resp:
        return resp.status, await resp.read()


# --- URL forms -------------------------------------------------------------------------------


def test_redis_url_forms() -> None:
    t = parse_redis_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert (t.mode, t.nodes, t.username, t.password) == (
        "cluster", (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)), "u", "p@ss")
    assert "p@ss" not in repr(t) and "p@ss" not in t.describe()
    t = parse_redis_url("rediss+sentinel://:pw@s1:26379,s2/mymaster/2?sentinel_password=x")
    assert (t.mode, t.tls, t.service, t.db, t.nodes[1]) == ("sentinel", True, "mymaster", 2, ("s2", 26379))
    assert dict(t.options) == {"sentinel_password": "x"}
    assert parse_redis_url("redis://h:1/0").mode == "standalone"
    for bad in ("redis+cluster://", "redis+cluster://h:1/3", "redis+sentinel://h:1", "redis+sentinel://h:1/m/x",
                "redis+cluster://h:99999", "redis+cluster://h:1?db=2", "memcached://h:1", "redis+sentinel://h/m/1/2"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


# --- Cluster ---------------------------------------------------------------------------------


async def test_keys_requests_and_usage_on_a_cluster(
    start_gateway: Any, cluster: LocalCluster, cluster_url: str, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(cluster_url)
    key, record = await gw.create_key("on-cluster", org="acme")
    assert [r.key_id for r in await gw.state.keys.list()] == [record.key_id]
    async with http.get(gw.url + "/v1/models", headers=auth(key)) as resp:
        assert resp.status == 200
    status, body = await _chat(http, gw, key, headers={"x-mock-tokens": "7"})
    assert status == 200 and b'"completion_tokens":7' in body.replace(b" ", b"")
    status, body = await _chat(http, gw, key, stream=True, stream_options={"include_usage": True})
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    status, _ = await _chat(http, gw, "lt_" + "x" * 40)
    assert status == 401
    await gw.settled()

    client = cluster.client()
    try:
        records = [fields for _, fields in client.xrange(USAGE_STREAM)]
        assert [(r[b"key_id"], r[b"stream"], r[b"status"]) for r in records] == [
            (record.key_id.encode(), b"0", b"200"), (record.key_id.encode(), b"1", b"200")]  # fmt: skip
        assert records[0][b"completion_tokens"] == b"7"
        # Every lease was released: the concurrency set (on the key's slot) is empty.
        assert client.zcard(concurrency_set(limit_tag(record.key_id, "acme"), record.key_id)) == 0
    finally:
        client.close()


async def test_a_revocation_reaches_every_replica_through_cluster_pub_sub(
    start_gateway: Any, cluster_url: str, http: aiohttp.ClientSession
) -> None:
    # Each gateway subscribes on one seed node; PUBLISH on any node reaches every node.
    gw_a = await start_gateway(cluster_url, key_cache_ttl=60)
    gw_b = await start_gateway(cluster_url, key_cache_ttl=60)
    key, record = await gw_a.create_key("revoked")
    for gw in (gw_a, gw_b):
        async with http.get(gw.url + "/v1/models", headers=auth(key)) as resp:
            assert resp.status == 200  # now cached for a minute on both
    await gw_a.state.keys.revoke(record.key_id)
    deadline = time.monotonic() + 3
    while True:
        async with http.get(gw_b.url + "/v1/models", headers=auth(key)) as resp:
            if resp.status == 401 or time.monotonic() > deadline:
                break
        await asyncio.sleep(0.05)
    assert resp.status == 401


async def test_rate_limit_is_exact_on_a_cluster(start_gateway: Any, cluster_url: str, http: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cluster_url, limits=Limits(rpm=10_000, tpm=10_000_000, max_concurrent=0))
    key, _ = await gw.create_key("limited", rpm=30)
    statuses = await asyncio.gather(*(_chat(http, gw, key) for _ in range(50)))
    codes = sorted(s for s, _ in statuses)
    assert codes.count(200) == 30 and codes.count(429) == 20, codes


async def test_noscript_on_every_node_is_handled(
    start_gateway: Any, cluster: LocalCluster, cluster_url: str, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(cluster_url)
    key, record = await gw.create_key("noscript")
    assert (await _chat(http, gw, key))[0] == 200

    def flush_scripts() -> None:
        for node in cluster.clients():
            node.script_flush()
            node.close()

    # Flushed between requests: the next EVALSHA of acquire.lua gets NOSCRIPT and reloads.
    flush_scripts()
    assert (await _chat(http, gw, key))[0] == 200
    # Flushed while a stream is in flight: its settlement (finish.lua + record_usage.lua, pipelined
    # by the usage writer) gets NOSCRIPT and is retried after the reload.
    slow = asyncio.create_task(_chat(http, gw, key, stream=True, headers={"x-mock-interval-ms": "50", "x-mock-tokens": "6"}))
    await asyncio.sleep(0.15)
    flush_scripts()
    status, body = await slow
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    await gw.settled()
    # No request started after the second flush: only the usage writer's reload (on NOSCRIPT,
    # to every primary) can have put the settlement scripts back.
    scripts = gw.state.store.scripts
    for node in cluster.primaries():
        assert node.script_exists(scripts.finish.sha, scripts.record_usage.sha) == [True, True]
        node.close()
    client = cluster.client()
    try:
        records = [f for _, f in client.xrange(USAGE_STREAM) if f[b"key_id"] == record.key_id.encode()]
        assert len(records) == 3
        assert client.zcard(concurrency_set(limit_tag(record.key_id, None), record.key_id)) == 0
    finally:
        client.close()


async def test_an_unreachable_cluster_is_a_store_outage(
    start_gateway: Any, cluster_url: str, http: aiohttp.ClientSession
) -> None:
    # A key made on the real cluster, served by a gateway whose seed nodes all refuse connections.
    gw = await start_gateway(cluster_url)
    key, _ = await gw.create_key("outage")
    dead = await start_gateway("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in free_ports(2)))
    status, body = await _chat(http, dead, key)
    assert status == 503 and b"store_unavailable" in body, body
    with pytest.raises(redis.exceptions.ConnectionError):
        await dead.state.store.redis.ping()


async def test_four_replicas_share_one_limit_on_a_cluster(
    tmp_path: Path, mock_upstream: str, cluster: LocalCluster, cluster_url: str
) -> None:
    async with Replicas(tmp_path, cluster_url, mock_upstream, count=4) as replicas:
        key, record = await replicas.create_key(rpm=120)
        primaries = cluster.primaries()
        client = cluster.client()
        try:
            statuses, released = await burst(replicas.urls, key, 400, primaries)
            bucket = client.hgetall(key_bucket(limit_tag(record.key_id, None), record.key_id, "rpm"))
        finally:
            client.close()
            for node in primaries:
                node.close()
    admitted = statuses.count(200)
    assert statuses.count(429) == 400 - admitted, sorted(set(statuses))
    extra = refilled(120, released, bucket)
    assert admitted == 120, f"admitted {admitted}; tokens that could have refilled meanwhile: {extra}"


async def _readyz(http: aiohttp.ClientSession, gw: Gateway) -> tuple[int, dict[str, Any]]:
    async with http.get(gw.url + "/readyz") as resp:
        return resp.status, await resp.json()


async def _readyz_until(
    http: aiohttp.ClientSession, gw: Gateway, status: int, within: float, store: str | None = None
) -> dict[str, Any]:
    """Poll `/readyz` until it answers `status` (and, given `store`, that `"store"`)."""
    deadline = time.monotonic() + within
    while True:
        got, body = await _readyz(http, gw)
        if (got == status and body.get("store", store) == store) or time.monotonic() > deadline:
            assert (got, body.get("store", store)) == (status, store), body
            return body
        await asyncio.sleep(0.05)


async def test_readyz_pings_every_primary(
    start_gateway: Any, cluster: LocalCluster, cluster_url: str, http: aiohttp.ClientSession
) -> None:
    closed = await start_gateway(cluster_url)
    open_ = await start_gateway(cluster_url, store_outage_policy="fail_open")
    for gw in (closed, open_):
        await _readyz_until(http, gw, 200, within=5, store="up")
    # A primary other than the one the client would ping by default stops answering clients
    # (CLIENT PAUSE ALL holds PING too; the cluster bus goes on, so no failover starts).
    default = closed.state.store.redis.get_default_node().port
    silent = next(c for c in cluster.primaries() if c.connection_pool.connection_kwargs["port"] != default)
    try:
        silent.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        paused = time.monotonic()
        # Still ready (the other primaries' keys are served), and saying so; store_up is 0.
        for gw in (closed, open_):
            await _readyz_until(http, gw, 200, within=1.5, store="partial (2 of 3 primaries answer)")
        assert time.monotonic() - paused < 2.5  # both seen while the primary is still silent
        async with http.get(closed.url + "/metrics") as resp:
            assert "liutong_store_up 0.0" in await resp.text()
        # The limiter still tries the store: the other primaries' slots are served meanwhile.
        assert not closed.state.limiter.store_down and not open_.state.limiter.store_down
        for gw in (closed, open_):
            await _readyz_until(http, gw, 200, within=5, store="up")
    finally:
        silent.close()


async def test_a_master_fails_over_and_its_replica_gets_the_scripts(
    start_gateway: Any, cluster: LocalCluster, cluster_url: str, http: aiohttp.ClientSession
) -> None:
    # Last of the cluster tests: it leaves the cluster with one master that has no replica.
    gw = await start_gateway(cluster_url)
    key, record = await gw.create_key("failover")
    bucket = key_bucket(limit_tag(record.key_id, None), record.key_id, "rpm")
    assert (await _chat(http, gw, key))[0] == 200
    await gw.settled()
    dead = cluster.owner(bucket)
    master = redis.Redis(port=dead)
    replica_port = int(master.info("replication")["slave0"]["port"])
    replica = redis.Redis(port=replica_port)
    assert master.execute_command("WAIT", 1, 2000) == 1  # the replica has everything so far
    assert replica.script_exists(gw.state.store.scripts.acquire.sha) == [False]

    cluster.process[dead].kill()
    cluster.process[dead].wait()
    # Readiness follows the failover on its own, with no request to refresh the topology:
    # partial while a primary is gone, up once its replica is promoted.
    await _readyz_until(http, gw, 200, within=1.5, store="partial (2 of 3 primaries answer)")
    await _readyz_until(http, gw, 200, within=20, store="up")
    statuses: list[int] = []
    deadline = time.monotonic() + 20
    while statuses[-3:] != [200] * 3 and time.monotonic() < deadline:
        statuses.append((await _chat(http, gw, key))[0])
        await asyncio.sleep(0.05)
    assert statuses[-3:] == [200] * 3 and set(statuses) <= {200, 503}, statuses
    assert cluster.owner(bucket) == replica_port
    assert replica.script_exists(gw.state.store.scripts.acquire.sha) == [True]
    await gw.settled()
    client = cluster.client()
    try:
        records = [f for _, f in client.xrange(USAGE_STREAM) if f[b"key_id"] == record.key_id.encode()]
        assert len(records) == 1 + statuses.count(200)
        assert client.zcard(concurrency_set(limit_tag(record.key_id, None), record.key_id)) == 0
    finally:
        client.close()


# --- Sentinel --------------------------------------------------------------------------------


class LocalSentinel:
    """A master, its replica and one sentinel watching them (quorum 1) on free ports."""

    SERVICE = "lt-master"

    def __init__(self, processes: Processes) -> None:
        self.master, self.replica, self.sentinel = free_ports(3)
        self.master_process = processes.server(self.master)
        processes.server(self.replica, "--replicaof", "127.0.0.1", str(self.master))
        _wait(lambda: redis.Redis(port=self.replica).info("replication")["master_link_status"] == "up", "replication")
        config = processes.dir / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel}\nbind 127.0.0.1\ndir {processes.dir}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 500\n"
            f"sentinel failover-timeout {self.SERVICE} 3000\n"
        )
        processes.spawn(str(config), "--sentinel")
        sentinel = redis.Redis(port=self.sentinel, socket_timeout=0.5)
        _wait(lambda: sentinel.execute_command("SENTINEL", "REPLICAS", self.SERVICE), "the sentinel to see the replica")

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{self.SERVICE}/0"

    def master_port(self) -> int:
        sentinel: Any = redis.Redis(port=self.sentinel)
        _host, port = sentinel.sentinel_get_master_addr_by_name(self.SERVICE)
        return int(port)


@pytest.fixture(scope="module")
def sentinel(topology: Processes) -> LocalSentinel:
    return LocalSentinel(topology)


async def test_gateway_finds_the_master_through_sentinel_and_follows_a_failover(
    start_gateway: Any, sentinel: LocalSentinel, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(sentinel.url)
    key, record = await gw.create_key("via-sentinel")
    assert (await _chat(http, gw, key))[0] == 200
    await gw.settled()
    master, replica = redis.Redis(port=sentinel.master), redis.Redis(port=sentinel.replica)
    assert master.exists(f"liutong:key:{record.digest}") and master.xlen(USAGE_STREAM) == 1
    _wait(lambda: replica.xlen(USAGE_STREAM) == 1, "the replica to catch up")
    assert replica.script_exists(gw.state.store.scripts.acquire.sha) == [False]

    # The master dies; the sentinel promotes the replica. The gateway's connections fail, it
    # asks the sentinel again and, on the new master (whose script cache is empty: scripts are
    # not replicated), reloads the scripts on NOSCRIPT. Requests made during the failover get
    # 503 `store_unavailable` (fail_closed), never a wrong answer.
    sentinel.master_process.kill()
    sentinel.master_process.wait()
    statuses: list[int] = []
    deadline = time.monotonic() + 15
    while not statuses[-3:] == [200] * 3 and time.monotonic() < deadline:
        statuses.append((await _chat(http, gw, key))[0])
        await asyncio.sleep(0.05)
    assert statuses[-3:] == [200] * 3 and set(statuses) <= {200, 503}, statuses
    assert sentinel.master_port() == sentinel.replica
    await gw.settled()
    _wait(lambda: replica.xlen(USAGE_STREAM) == 1 + statuses.count(200), "the settlements on the new master", 10)
    assert replica.zcard(concurrency_set(limit_tag(record.key_id, None), record.key_id)) == 0
