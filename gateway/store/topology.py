"""Which Redis the store talks to, read from `redis_url`: one server, a Cluster, or Sentinel.

`parse_redis_url` reads the URL into a `RedisTarget` (a bad URL raises `ValueError` saying what
is wrong); `connect` builds the redis-py asyncio client for it. Every mode gets the same socket
timeouts and a bounded pool whose callers *wait* up to the store timeout for a free connection
rather than fail at once, so that a burst larger than the pool is answered with 429s, not 503s.

- `redis://[user:password@]host:port/db`, `rediss://…` (TLS), `unix:///path.sock?db=N`: one server.
- `redis+cluster://[user:password@]host:port[,host:port…]` (`rediss+cluster://` for TLS): a Redis
  Cluster. The nodes listed are seeds; the rest of the topology is discovered and followed
  through MOVED/ASK and failovers. A script runs on the slot of its keys' `{hash tag}`, and
  `SCRIPT LOAD` goes to every primary, as does readiness's PING (`ping_primaries`).
- `redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]` (`rediss+sentinel://`):
  the master of `service`, asked of these sentinels, and asked again after a failover. The
  user and password are the master's; `?sentinel_username=…&sentinel_password=…` are the
  sentinels' own, when they need one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisClusterException, SlotNotCoveredError

Mode = Literal["standalone", "cluster", "sentinel"]

SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"}
_SENTINEL_OPTIONS = {"sentinel_username", "sentinel_password"}
# A topology refresh (CLUSTER SLOTS) borrows a node connection on top of the commands in flight.
_SPARE_CLUSTER_CONNECTIONS = 4


@dataclass(frozen=True, slots=True)
class RedisTarget:
    mode: Mode
    url: str = field(default="", repr=False)  # standalone: the URL itself, read by redis-py
    nodes: tuple[tuple[str, int], ...] = ()  # cluster seeds, or the sentinels
    service: str = ""  # sentinel: the monitored master's name
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # ssl_* and sentinel_*

    def describe(self) -> str:
        """Where the store is, for logs: no credentials."""
        if self.mode == "standalone":
            parts = urlsplit(self.url)
            return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        nodes = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.mode == "cluster":
            return f"cluster {nodes}"
        return f"sentinel {nodes} service {self.service} db {self.db}"


def _node(text: str, mode: Mode) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"empty host in {text!r}")
    if not port_text:
        return host, _DEFAULT_PORT[mode]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def parse_redis_url(url: str) -> RedisTarget:
    """The target a `redis_url` names; `ValueError` (saying what is wrong) when it names none."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        # The rest of the URL is not echoed: it may hold a password.
        raise ValueError(f"expected one of {', '.join(s + '://' for s in SCHEMES)}, got {scheme + sep or url[:16]!r}…")
    mode, tls = SCHEMES[scheme.lower()]
    if mode == "standalone":
        return RedisTarget("standalone", url=url, tls=tls)
    parts = urlsplit(f"{scheme}://{rest}")
    if parts.fragment:
        raise ValueError(f"unexpected #fragment in {scheme}:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(h.strip(), mode) for h in hosts.split(",") if h.strip())
    if not nodes:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    options = tuple(parse_qsl(parts.query, keep_blank_values=True))
    allowed = (_TLS_OPTIONS if tls else set()) | (_SENTINEL_OPTIONS if mode == "sentinel" else set())
    for name, _value in options:
        if name not in allowed:
            raise ValueError(f"unknown option {name!r} in {scheme}:// URL (known: {', '.join(sorted(allowed)) or 'none'})")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if mode == "cluster":
        if segments not in ([], ["0"]):
            raise ValueError("a Redis Cluster has only database 0: no path after the hosts")
        return RedisTarget("cluster", nodes=nodes, tls=tls, username=username, password=password, options=options)
    if not segments or len(segments) > 2:
        raise ValueError(f"{scheme}:// needs the master's name as the path: {scheme}://host:port/service[/db]")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError(f"bad database number {segments[1]!r} after the service name")
    db = int(segments[1]) if len(segments) == 2 else 0
    return RedisTarget(
        "sentinel", nodes=nodes, service=segments[0], db=db, tls=tls, username=username, password=password, options=options
    )


# --- the clients -----------------------------------------------------------------------------

_HOLDING_TURN: ContextVar[bool] = ContextVar("liutong_redis_turn", default=False)


class ClusterUnreachable(RedisConnectionError):
    """No node of the Cluster answered, or none serves a slot (a failover in progress). redis-py
    raises these as `RedisClusterException`, which is not a `RedisError`; as a `ConnectionError`
    they are what they are to the gateway: a store outage (503, or the `fail_open` policy)."""


class _BoundedCluster(RedisCluster):
    """A RedisCluster with at most `limit` commands (or pipelines) in flight in this process: the
    next waits up to `wait` seconds for a turn, as with a blocking connection pool. (redis-py's
    cluster pools raise MaxConnectionsError at once when full.)"""

    def __init__(self, *, limit: int, wait: float, **kwargs: Any) -> None:
        super().__init__(max_connections=limit + _SPARE_CLUSTER_CONNECTIONS, **kwargs)
        self._turns = asyncio.Semaphore(limit)
        self._wait = wait

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _HOLDING_TURN.get():  # a redirection retried inside a pipeline that holds a turn
            yield
            return
        try:
            async with asyncio.timeout(self._wait):
                await self._turns.acquire()
        except TimeoutError:
            raise MaxConnectionsError("every store connection stayed busy for the store timeout") from None
        token = _HOLDING_TURN.set(True)
        try:
            yield
        finally:
            _HOLDING_TURN.reset(token)
            self._turns.release()

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:  # no startup node reachable, or slots not covered
            raise ClusterUnreachable(str(exc)) from exc

    async def ping_primaries(self, timeout: float) -> tuple[int, int]:
        """PING every primary, each on its own within `timeout` seconds: (how many answered, how
        many primaries there are). When one does not answer, the topology is read again at once
        (a failover may have promoted its replica), so that this follows the Cluster even when
        no request does. The pings bypass the turns: a burst of requests cannot starve them (a
        node's pool keeps `_SPARE_CLUSTER_CONNECTIONS` connections beyond the turns)."""
        await self.initialize()  # ClusterUnreachable when no seed answers

        async def answers(node: ClusterNode) -> bool:
            try:
                async with asyncio.timeout(timeout):
                    await node.execute_command("PING")
            except Exception:
                return False
            return True

        primaries = self.get_primaries()
        answered = sum(await asyncio.gather(*(answers(node) for node in primaries)))
        if answered < len(primaries):
            with contextlib.suppress(Exception):  # no node answers CLUSTER SLOTS: the next call retries
                await self.nodes_manager.initialize()
        return answered, len(primaries)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            try:
                return await super().execute_command(*args, **kwargs)
            except SlotNotCoveredError as exc:
                raise ClusterUnreachable(str(exc)) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises: no shard hints on a cluster
        return _BoundedClusterPipeline(self, transaction)  # type: ignore[abstract]


class _BoundedClusterPipeline(ClusterPipeline):
    """A cluster pipeline (non-transactional: each command goes to its slot's node) that takes a
    turn on the client and that accepts EVALSHA."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> ClusterPipeline:
        # redis-py blocks EVALSHA in cluster pipelines because a script's keys *might* span
        # slots. Every gateway script's keys share one {hash tag}, so the call is routed to
        # that slot like any keyed command (and keys that did span slots fail the whole
        # pipeline at `execute`, before anything is sent). NOSCRIPT comes back as the call's
        # result; the caller reloads the scripts (`Store.load_scripts`) and retries.
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, _BoundedCluster)  # type narrowing: open_cluster builds only these
        async with client.turn():
            try:
                return await super().execute(raise_on_error, allow_redirections)
            except SlotNotCoveredError as exc:
                raise ClusterUnreachable(str(exc)) from exc


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's pool, found through Sentinel, whose callers wait for a free connection."""


class _SentinelMaster(aioredis.Redis):
    """The master's client; closing it closes the clients of the sentinels it asks too."""

    sentinel_manager: Sentinel | None = None  # (not `sentinel`: that is the SENTINEL command)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            await self.sentinel_manager.aclose()


def _tls_kwargs(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    return {"ssl": True, **{k: v for k, v in target.options if k in _TLS_OPTIONS}}


def _sentinel_master(target: RedisTarget, sentinel_timeout: float, **kwargs: Any) -> _SentinelMaster:
    """The master's client (`kwargs` configure its pool), asking `target.nodes` where it is."""
    options = dict(target.options)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": sentinel_timeout, "socket_connect_timeout": sentinel_timeout}
    if options.get("sentinel_username"):
        sentinel_kwargs["username"] = options["sentinel_username"]
    if options.get("sentinel_password"):
        sentinel_kwargs["password"] = options["sentinel_password"]
    sentinel_kwargs.update(_tls_kwargs(target))
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        target.service,
        redis_class=_SentinelMaster,
        db=target.db,
        username=target.username,
        password=target.password,
        **_tls_kwargs(target),
        **kwargs,
    )
    assert isinstance(client, _SentinelMaster)  # type narrowing: redis_class=_SentinelMaster above
    client.sentinel_manager = sentinel
    return client


def connect(target: RedisTarget, *, timeout: float, max_connections: int) -> Any:
    """The client for `target` (its `aclose()` closes everything it opened). Nothing connects
    until the first command."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
        "decode_responses": False,
        # A pooled connection from before a Redis restart fails its first command: retry it once
        # on a fresh connection instead of answering 503 to a healthy store.
        "retry": Retry(NoBackoff(), 1),
    }
    if target.mode == "standalone":
        pool = BlockingConnectionPool.from_url(target.url, max_connections=max_connections, timeout=timeout, **common)
        return aioredis.Redis.from_pool(pool)
    if target.mode == "cluster":
        return _BoundedCluster(
            limit=max_connections,
            wait=timeout,
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            **common,
            **_tls_kwargs(target),
        )
    return _sentinel_master(
        target, timeout, connection_pool_class=_BlockingSentinelPool, max_connections=max_connections,
        timeout=timeout, **common,
    )  # fmt: skip


async def ping_primaries(client: Any, timeout: float) -> tuple[int, int]:
    """PING the store the way readiness needs it: every primary of a Cluster, else the one
    server (the master, under Sentinel), within `timeout` seconds each. Returns (how many
    answered, how many were asked); never raises."""
    if isinstance(client, _BoundedCluster):
        try:
            return await client.ping_primaries(timeout)
        except Exception:  # no node reachable at all
            return 0, max(1, len(client.get_primaries()))
    try:
        async with asyncio.timeout(timeout):
            await client.ping()
    except Exception:
        return 0, 1
    return 1, 1


def pubsub_client(url: str, *, connect_timeout: float) -> aioredis.Redis:
    """A plain client for one long-lived Pub/Sub connection (no read timeout) to the store that
    `url` names. On a Cluster any node will do (plain Pub/Sub messages reach every node): a seed
    node is picked at random each time; under Sentinel, the current master."""
    target = parse_redis_url(url)
    kwargs: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": None}
    if target.mode == "standalone":
        return aioredis.Redis.from_url(url, **kwargs)
    if target.mode == "cluster":
        host, port = random.choice(target.nodes)
        return aioredis.Redis(
            host=host, port=port, username=target.username, password=target.password, **kwargs, **_tls_kwargs(target)
        )
    return _sentinel_master(target, connect_timeout, **kwargs)
