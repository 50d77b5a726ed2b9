"""The lean pipelined Redis client (`gateway/store/resp.py`) against real redis-server processes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.client import open_store
from gateway.store.resp import RespClient
from tests.conftest import RedisServer, free_port


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def test_concurrent_callers_each_get_their_own_reply(redis_url: str, redis_server: RedisServer) -> None:
    client = RespClient("127.0.0.1", redis_server.port, timeout=2.0)
    try:
        replies = await asyncio.gather(*(client.execute("INCR", "lt:test:n") for _ in range(2000)))
        assert sorted(replies) == list(range(1, 2001))
        assert await client.execute("SET", "lt:test:s", "é" * 3) == b"OK"
        assert await client.execute("GET", "lt:test:s") == "é".encode() * 3
        assert await client.execute("GET", "lt:test:missing") is None
    finally:
        await client.aclose()


async def test_error_replies_stay_in_their_place(redis_url: str, redis_server: RedisServer) -> None:
    client = RespClient("127.0.0.1", redis_server.port, timeout=2.0)
    try:
        replies = await client.execute_many([
            ("SET", "lt:test:a", 1), ("INCR", "lt:test:no-such-command", "extra"), ("EVALSHA", "0" * 40, 0),
            ("GET", "lt:test:a"),
        ])  # fmt: skip
        assert replies[0] == b"OK" and replies[3] == b"1"
        assert isinstance(replies[1], ResponseError) and not isinstance(replies[1], NoScriptError)
        assert isinstance(replies[2], NoScriptError)
        with pytest.raises(NoScriptError):
            await client.execute("EVALSHA", "0" * 40, 0)
        assert await client.execute("PING") == b"PONG"  # still in step after errors
    finally:
        await client.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(redis_url: str, redis_server: RedisServer) -> None:
    client = RespClient("127.0.0.1", redis_server.port, timeout=2.0)
    try:
        assert await client.execute("PING") == b"PONG"  # connected: the next command is sent at once
        slow = asyncio.ensure_future(client.execute("EVAL", "redis.call('INCR', KEYS[1]); return 'slow'", 1, "lt:test:c"))
        await asyncio.sleep(0)
        slow.cancel()
        assert await client.execute("ECHO", "mine") == b"mine"
        assert await client.execute("GET", "lt:test:c") == b"1"  # the cancelled command still ran
    finally:
        await client.aclose()


# A script blocks the whole server while it runs (DEBUG SLEEP is not enabled by default).
_BUSY_SECOND = """
local t = redis.call('TIME'); local stop = tonumber(t[1]) + tonumber(t[2]) / 1e6 + 1
repeat t = redis.call('TIME') until tonumber(t[1]) + tonumber(t[2]) / 1e6 >= stop
return 1
"""


async def test_a_stalled_server_times_out_and_the_next_call_reconnects(own_redis: RedisServer) -> None:
    client = RespClient("127.0.0.1", own_redis.port, timeout=0.3)
    blocker = RespClient("127.0.0.1", own_redis.port, timeout=5.0)
    try:
        assert await client.execute("PING") == b"PONG"
        stall = asyncio.ensure_future(blocker.execute("EVAL", _BUSY_SECOND, 0))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(client.execute("PING"), client.execute("PING"), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert 0.25 <= loop.time() - started < 0.8
        await stall
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()
        await blocker.aclose()


async def test_server_down_then_back(own_redis: RedisServer) -> None:
    client = RespClient("127.0.0.1", own_redis.port, timeout=0.5)
    try:
        assert await client.execute("SET", "lt:test:k", "v") == b"OK"
        own_redis.stop()
        with pytest.raises(RedisConnectionError):
            await client.execute("PING")
        with pytest.raises(RedisConnectionError):  # refused at once: nothing listens
            await client.execute("PING")
        own_redis.start()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_nothing_listening_is_a_connection_error() -> None:
    client = RespClient("127.0.0.1", free_port(), timeout=0.5)
    with pytest.raises(RedisConnectionError):
        await client.execute("PING")
    with pytest.raises(RedisConnectionError):
        await client.execute_many([("PING",)])


async def test_a_server_that_accepts_and_never_answers_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        client = RespClient("127.0.0.1", listener.getsockname()[1], timeout=0.2)
        with pytest.raises(RedisTimeoutError):
            await client.execute("PING")
        await client.aclose()
    finally:
        listener.close()


async def test_password_and_database_from_the_url(own_redis: RedisServer) -> None:
    admin = own_redis.client()
    admin.config_set("requirepass", "s3cret")  # this server is the test's own, stopped after it
    admin.close()
    store = open_store(f"redis://:s3cret@127.0.0.1:{own_redis.port}/3", timeout=1.0)
    assert store.lane is not None
    assert await store.lane.execute("SET", "lt:test:db", "three") == b"OK"
    assert await store.redis.get("lt:test:db") == b"three"  # redis-py, same database
    await store.close()
    wrong = open_store(f"redis://:wrong@127.0.0.1:{own_redis.port}/0", timeout=1.0)
    assert wrong.lane is not None
    with pytest.raises(ResponseError):
        await wrong.lane.execute("PING")
    await wrong.close()


async def test_scripts_are_loaded_again_after_a_script_flush(redis_url: str, redis_server: RedisServer) -> None:
    store = open_store(redis_url, timeout=1.0)
    try:
        await store.load_scripts()
        redis_server.client().script_flush()
        keys, args = ["lt:test:{k}:rpm", "lt:test:{k}:inflight"], [1, "m1", 0, 60000, 10, 1]
        reply = await store.run(store.scripts.acquire, keys, args)
        assert reply[0] == 1
        redis_server.client().script_flush()
        (finished,) = await store.run_many([(store.scripts.finish, keys, [1, "m1", 10, 0])])
        assert finished == 1
    finally:
        await store.close()
