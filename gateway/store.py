"""The shared store: a Redis client (or the embedded in-process store) and the Lua scripts.

`open_store(settings)` returns a `Store`: a redis-py asyncio client with explicit timeouts and
a bounded pool against `redis_url` (one server, a Cluster or a Sentinel-managed master: see
`redis_topology.py`), or, with no URL, fakeredis running the very same Lua scripts in-process
(nothing shared, nothing kept across restarts). Scripts are `.lua` files shipped with the
package, registered once and run with EVALSHA (redis-py reloads them on NOSCRIPT, on every
primary of a Cluster). Every Redis key the gateway uses is made here, starting with `liutong:`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

from gateway.redis_topology import connect, parse_redis_url

PREFIX = "liutong:"


def _lua(name: str) -> str:
    return resources.files("gateway").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    acquire: AsyncScript
    finish: AsyncScript
    record_usage: AsyncScript


@dataclass(frozen=True, slots=True)
class Store:
    redis: Any  # redis.asyncio.Redis, RedisCluster or fakeredis's FakeRedis: the same interface
    scripts: Scripts
    embedded: bool

    async def load_scripts(self) -> None:
        """Load every script now (on every primary of a Cluster), so that the first pipelined
        EVALSHA finds it."""
        for script in (self.scripts.acquire, self.scripts.finish, self.scripts.record_usage):
            await self.redis.script_load(script.script)

    async def close(self) -> None:
        await self.redis.aclose()


def open_store(redis_url: str | None, *, timeout: float = 0.5, max_connections: int = 64) -> Store:
    if redis_url:
        client = connect(parse_redis_url(redis_url), timeout=timeout, max_connections=max_connections)
        embedded = False
    else:
        import fakeredis

        client = fakeredis.FakeAsyncRedis()
        embedded = True
    scripts = Scripts(
        acquire=client.register_script(_lua("acquire")),
        finish=client.register_script(_lua("finish")),
        record_usage=client.register_script(_lua("record_usage")),
    )
    return Store(redis=client, scripts=scripts, embedded=embedded)


# --- key names ------------------------------------------------------------------------------
# Buckets and the concurrency set of a key share one hash tag with its org's buckets (the org
# when it has one), so that one script call can check them all on a Redis Cluster slot.


def limit_tag(key_id: str, org: str | None) -> str:
    return f"{{o:{org}}}" if org else f"{{k:{key_id}}}"


def key_bucket(tag: str, key_id: str, kind: str) -> str:
    return f"{PREFIX}{tag}:key:{key_id}:{kind}"


def org_bucket(tag: str, org: str, kind: str) -> str:
    return f"{PREFIX}{tag}:org:{org}:{kind}"


def concurrency_set(tag: str, key_id: str) -> str:
    return f"{PREFIX}{tag}:key:{key_id}:inflight"


def key_record(digest_hex: str) -> str:
    return f"{PREFIX}key:{digest_hex}"


def key_id_index(key_id: str) -> str:
    return f"{PREFIX}keyid:{key_id}"


KEY_IDS = f"{PREFIX}keys"


def org_record(org: str) -> str:
    return f"{PREFIX}org:{org}"


ORGS = f"{PREFIX}orgs"

USAGE_TAG = "{usage}"
USAGE_STREAM = f"{PREFIX}{USAGE_TAG}:records"


def usage_marker(request_id: str) -> str:
    return f"{PREFIX}{USAGE_TAG}:seen:{request_id}"


def usage_aggregate(scope: str, name: str, period: str) -> str:
    """`scope` is `key` or `org`; `period` is `h:YYYYMMDDHH` or `d:YYYYMMDD` (UTC)."""
    return f"{PREFIX}{USAGE_TAG}:agg:{scope}:{name}:{period}"
