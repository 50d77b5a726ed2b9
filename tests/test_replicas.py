"""Limits across replicas: four `serve` processes sharing one Redis enforce one key's limit exactly.

Each replica is `python -m gateway serve` (a `GatewayProcess`) on its own port, all pointed at
the same store and the same mock upstream. A burst of concurrent requests spread evenly over the
replicas must be admitted exactly as one process would admit it: every admission is one atomic
`acquire.lua` in the shared store, so no replica can spend a token another already spent.
`test_cluster.py` runs the same burst against a Redis Cluster.

The bucket refills continuously (rpm/60 tokens a second), so "exactly rpm admitted" holds for a
burst that reaches the store within 60/rpm seconds (0.5 s at rpm 120). Four Python processes
on a small, busy machine can take longer than that to parse 400 requests, so `burst` holds the
store's writes (`CLIENT PAUSE … WRITE`) while the requests travel through the replicas, and
lets them all reach the limiter together. Exactly rpm must then be admitted; a failure says how
many tokens could have refilled while the store admitted the burst (`refilled`, by Redis's clock).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import redis
import yaml

from gateway.keys.records import KeyRecord, KeyService
from gateway.store.client import open_store
from gateway.store.names import key_bucket, limit_tag
from tests.conftest import SEED_MODELS, GatewayProcess, chat_body

pytestmark = pytest.mark.integration

# Per replica: enough for every request of the burst to wait at the paused store at once.
STORE_CONNECTIONS = 128


class Replicas:
    """`count` gateway processes on one store; all stopped (SIGTERM, then waited for) on exit."""

    def __init__(self, tmp: Path, redis_url: str, upstream: str, *, count: int = 4) -> None:
        self.redis_url = redis_url
        self.processes: list[GatewayProcess] = []
        for index in range(count):
            config = tmp / f"replica-{index}.yaml"
            config.write_text(yaml.safe_dump(self._config(index, tmp, upstream)))
            # The replicas read their settings from the file only, not from this shell's LIUTONG_*.
            env = {k: "" for k in os.environ if k.startswith("LIUTONG_") and k != "LIUTONG_WORKER"}
            self.processes.append(GatewayProcess(config, env))

    def _config(self, index: int, tmp: Path, upstream: str) -> dict[str, Any]:
        return {
            "redis_url": self.redis_url,
            "models": {m: {"upstreams": [upstream]} for m in SEED_MODELS},
            # Defaults that never bind: the key's own rpm is the limit under test.
            "limits": {"default": {"rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrent": 0}},
            "store_max_connections": STORE_CONNECTIONS,
            # The burst waits at the paused store for up to 5 s (see `burst`); a 0.5 s store
            # timeout would turn that wait into 503s, which is not what this test is about.
            "store_timeout": 8,
            "log_level": "warning",
            "drain_grace_seconds": 1,
            "usage_spool_path": str(tmp / f"replica-{index}.spool"),
        }

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.processes]

    async def __aenter__(self) -> Replicas:
        try:
            await asyncio.gather(*(asyncio.to_thread(p.start) for p in self.processes))
            await self._ready()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self._stop()

    async def _ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            for url in self.urls:
                while True:
                    try:
                        async with http.get(url + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline:
                        raise AssertionError(f"replica {url} not ready")
                    await asyncio.sleep(0.05)

    async def _stop(self) -> None:
        codes = await asyncio.gather(*(asyncio.to_thread(p.stop) for p in self.processes))
        for process, code in zip(self.processes, codes, strict=True):
            assert code == 0, process.stderr()[-2000:]

    async def create_key(self, **options: Any) -> tuple[str, KeyRecord]:
        store = open_store(self.redis_url, timeout=2.0)
        try:
            return await KeyService(store.redis).create("replicas", **options)
        finally:
            await store.close()


async def _read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response off a kept-alive connection (Content-Length or chunked); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    return status


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def burst(urls: list[str], key: str, total: int, nodes: Sequence[redis.Redis]) -> tuple[list[int], int]:
    """`total` chat requests at once, spread evenly over the replicas at `urls`: their statuses,
    and the Redis time (ms) at which the requests were let through to the limiter.

    Every connection is opened and every replica has authenticated the key (`GET /v1/models`
    spends no limit) before the burst. Then the store `nodes` pause their writes (scripts
    included), all requests are written at once on raw sockets, and the pause is lifted when
    every request's `acquire.lua` waits at the store (or after 5 s): from there on, admission
    is up to the limiter alone, and takes the store a few milliseconds.
    """
    body = orjson.dumps(chat_body())
    addresses = [urlsplit(url) for url in urls]
    conns = await asyncio.gather(
        *(asyncio.open_connection(a.hostname, a.port) for a in (addresses[i % len(urls)] for i in range(total)))
    )
    try:
        warm = f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
        for _, writer in conns:
            writer.write(warm)
        async with asyncio.timeout(60):
            assert set(await asyncio.gather(*(_read_response(reader) for reader, _ in conns))) == {200}
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        for node in nodes:
            node.client_pause(7000, all=False)  # lifted below; 7 s is only a safety net
        try:
            for _, writer in conns:
                writer.write(request)
            paused_at = time.monotonic()
            while (parked := sum(int(n.info("clients")["blocked_clients"]) for n in nodes)) < total:
                if time.monotonic() - paused_at > 5.0:
                    break
                await asyncio.sleep(0.02)
            print(f"{parked} requests waited at the store after {time.monotonic() - paused_at:.2f} s")
        finally:
            released = redis_now_ms(nodes[0])
            for node in nodes:
                node.client_unpause()
        async with asyncio.timeout(60):  # never hang the suite on a lost response
            return list(await asyncio.gather(*(_read_response(reader) for reader, _ in conns))), released
    finally:
        for _, writer in conns:
            writer.close()


def refilled(rpm: int, released_ms: int, bucket: Mapping[Any, Any]) -> int:
    """Whole tokens the bucket can have regained between the burst's release (`released_ms`,
    Redis time) and its last admission (the bucket's `ts`): 0 for a burst admitted within
    60/rpm seconds."""
    return max(0, (int(bucket[b"ts"]) - released_ms) * rpm // 60_000)


async def test_four_replicas_share_one_key_limit(tmp_path: Path, redis_server: Any, redis_url: str, mock_upstream: str) -> None:
    async with Replicas(tmp_path, redis_url, mock_upstream, count=4) as replicas:
        key, record = await replicas.create_key(rpm=120)
        node = redis_server.client()
        try:
            statuses, released = await burst(replicas.urls, key, 400, [node])
            bucket = node.hgetall(key_bucket(limit_tag(record.key_id, None), record.key_id, "rpm"))
        finally:
            node.close()
    admitted = statuses.count(200)
    per_replica = [statuses[i::4].count(200) for i in range(4)]
    extra = refilled(120, released, bucket)
    print(f"admitted {admitted} (per replica {per_replica}) within {int(bucket[b'ts']) - released} ms")
    assert statuses.count(429) == 400 - admitted, sorted(set(statuses))
    assert admitted == 120, f"admitted {admitted}; tokens that could have refilled meanwhile: {extra}"
