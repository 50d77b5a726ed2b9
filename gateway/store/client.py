"""The shared store: a Redis client (or the embedded in-process store) and the Lua scripts.

`open_store(settings)` returns a `Store`: a redis-py asyncio client with explicit timeouts and
a bounded pool against `redis_url` (one server, a Cluster or a Sentinel-managed master: see
`store/topology.py`), or, with no URL, fakeredis running the very same Lua scripts in-process
(nothing shared, nothing kept across restarts). Scripts are `.lua` files shipped with the
package, registered once and run with EVALSHA by `Store.run` / `Store.run_many`, which load
them again on NOSCRIPT (on every primary of a Cluster). Against one server (`redis://`) those
two go through the lean pipelined client of `store/resp.py`, the request path's only Redis calls;
everything else uses redis-py. The Redis keys are named in `names.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio.connection import parse_url
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from gateway.store.resp import RespClient
from gateway.store.topology import connect, parse_redis_url


def lua_source(name: str) -> str:
    """The text of a Lua script shipped in `gateway/store/lua/`."""
    return resources.files("gateway.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    acquire: AsyncScript
    finish: AsyncScript
    record_usage: AsyncScript


ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]  # script, KEYS, ARGV


@dataclass(frozen=True, slots=True)
class Store:
    redis: Any  # redis.asyncio.Redis, RedisCluster or fakeredis's FakeRedis: the same interface
    scripts: Scripts
    embedded: bool
    lane: RespClient | None = None  # the request path's client, against one server

    async def load_scripts(self) -> None:
        """Load every script now (on every primary of a Cluster), so that the first pipelined
        EVALSHA finds it."""
        for script in (self.scripts.acquire, self.scripts.finish, self.scripts.record_usage):
            await self.redis.script_load(script.script)

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA one script (loading it first if the server lost it)."""
        if self.lane is None:
            return await script(keys=keys, args=args)
        try:
            return await self.lane.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.lane.execute("SCRIPT", "LOAD", script.script)
            return await self.lane.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    def run_now(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any] | None:
        """EVALSHA one script at once on the lean client's open connection: the raw reply (an
        error reply as a `hiredis.ReplyError` value); None when that is not possible (another
        topology, or no open connection), and `run` is the way."""
        if self.lane is None:
            return None
        return self.lane.send_now("EVALSHA", script.sha, len(keys), *keys, *args)

    async def run_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """EVALSHA several scripts in one pipeline; each reply, or the error (an exception
        instance) in its place. Scripts the server lost are loaded and those calls run again."""
        replies = await self._pipeline(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self.load_scripts()  # the server restarted or failed over
            again = await self._pipeline([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: Sequence[ScriptCall]) -> list[Any]:
        if self.lane is not None:
            return await self.lane.execute_many(
                [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]
            )
        pipe = self.redis.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def close(self) -> None:
        if self.lane is not None:
            await self.lane.aclose()
        await self.redis.aclose()


def open_store(redis_url: str | None, *, timeout: float = 0.5, max_connections: int = 64) -> Store:
    lane = None
    if redis_url:
        target = parse_redis_url(redis_url)
        client = connect(target, timeout=timeout, max_connections=max_connections)
        embedded = False
        if target.mode == "standalone" and redis_url.startswith("redis://"):
            where = parse_url(redis_url)
            lane = RespClient(
                where.get("host", "localhost"), int(where.get("port", 6379)), db=int(where.get("db", 0)),
                username=where.get("username"), password=where.get("password"), timeout=timeout,
            )  # fmt: skip
    else:
        import fakeredis

        client = fakeredis.FakeAsyncRedis()
        embedded = True
    scripts = Scripts(
        acquire=client.register_script(lua_source("acquire")),
        finish=client.register_script(lua_source("finish")),
        record_usage=client.register_script(lua_source("record_usage")),
    )
    return Store(redis=client, scripts=scripts, embedded=embedded, lane=lane)
