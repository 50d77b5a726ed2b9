"""The usage writer (`gateway/usage/writer.py`) and `record_usage.lua` against a real `redis-server`:
exactly once per record across lost replies, spool replays and writers; aggregates that agree
with the records; stream retention; outages (the server stopped and started again on the same
port, with its data kept) and a stop while the store is down; spools left by earlier processes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.store import names
from gateway.store.client import Store, open_store
from gateway.usage.records import Settlement, UsageRecord, day_index
from gateway.usage.spool import FileSpool, frame
from gateway.usage.writer import UsageWriter
from tests.conftest import RedisServer


class PersistentRedis(RedisServer):
    """A `redis-server` that keeps its data across stop/start (append-only file, flushed on SIGTERM),
    as a production server does: an outage, not a wipe."""

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()


@pytest.fixture(scope="module")
def persistent_redis() -> Iterator[PersistentRedis]:
    server = PersistentRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(persistent_redis: PersistentRedis) -> PersistentRedis:
    if persistent_redis.process is None:
        persistent_redis.start()
    client = persistent_redis.client()
    client.flushall()
    client.close()
    return persistent_redis


@pytest.fixture
async def store(durable_redis: PersistentRedis) -> AsyncIterator[Store]:
    s = open_store(durable_redis.url)
    await s.load_scripts()
    yield s
    await s.close()


def record(i: int, *, key: str = "key_a", org: str | None = "acme", started: float | None = None, status: int = 200,
           prompt: int = 10, completion: int = 5) -> UsageRecord:  # fmt: skip
    return UsageRecord(
        request_id=f"req-{i}", key_id=key, org=org, model="crimson-falcon-4", status=status, stream=bool(i % 2),
        prompt_tokens=prompt, completion_tokens=completion, usage_source="upstream",
        started_at=time.time() if started is None else started, duration_ms=12,
    )  # fmt: skip


def settlement(rec: UsageRecord) -> Settlement:
    return Settlement([], [], rec, [True, False])  # no lease to release: only the record


async def stream_records(s: Store) -> list[UsageRecord]:
    return [UsageRecord.from_fields(raw) for _, raw in await s.redis.xrange(names.USAGE_STREAM)]


async def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Written:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def __call__(self, rec: UsageRecord) -> None:
        self.records.append(rec)


async def test_record_fields_round_trip(store: Store) -> None:
    rec = record(1, org=None)
    assert UsageRecord.from_json(rec.to_json()) == rec
    writer = UsageWriter(store)
    writer.start()
    writer.submit(settlement(rec))
    await writer.close()
    (back,) = await stream_records(store)
    assert back == UsageRecord(**{**{f: getattr(rec, f) for f in rec.__dataclass_fields__},
                                  "started_at": round(rec.started_at, 3)})  # fmt: skip


async def test_a_lost_reply_is_retried_without_a_duplicate_and_counted_once(store: Store, tmp_path: Path) -> None:
    """The pipeline reaches Redis but its reply is lost: the batch goes to the spool, its replay
    finds this writer's own marker (reply 2) and counts the record then, once."""
    written = Written()
    writer = UsageWriter(store, spool=FileSpool(tmp_path / "u.spool"), on_written=written)
    assert store.lane is not None  # the request path's client: its pipelines carry the writes
    lane = store.lane
    real_execute_many = lane.execute_many
    lost = [True]

    async def execute_then_lose(commands: Any) -> Any:
        result = await real_execute_many(commands)
        if lost[0]:
            lost[0] = False
            raise RedisConnectionError("reply lost")
        return result

    lane.execute_many = execute_then_lose  # type: ignore[method-assign]
    try:
        writer.start()
        recs = [record(i) for i in range(20)]
        for rec in recs:
            writer.submit(settlement(rec))
        await until(lambda: _true(writer.pending == 0 and not lost[0]), what="the replay")
    finally:
        lane.execute_many = real_execute_many  # type: ignore[method-assign]
        await writer.close()
    stored = await stream_records(store)
    assert sorted(r.request_id for r in stored) == sorted(r.request_id for r in recs)
    assert Counter(r.record_id for r in written.records) == Counter({r.record_id: 1 for r in recs})
    # A second writer (another process replaying an old spool) changes nothing and counts nothing.
    other_written = Written()
    other = UsageWriter(store, on_written=other_written)
    other.start()
    for rec in recs:
        other.submit(settlement(rec))
    await other.close()
    assert len(await stream_records(store)) == 20 and other_written.records == []
    agg = await store.redis.hgetall(names.usage_aggregate("key", "key_a", recs[0].periods()[1]))
    assert agg[b"requests"] == b"20" and agg[b"prompt_tokens"] == b"200" and agg[b"completion_tokens"] == b"100"


async def _true(value: bool) -> bool:
    return value


async def test_two_requests_reusing_a_request_id_are_two_records(store: Store) -> None:
    """The idempotence marker is named by the record id, not the client's x-request-id: a
    client reusing its request ids cannot make its requests vanish from billing."""
    writer = UsageWriter(store)
    writer.start()
    writer.submit(settlement(record(7)))
    writer.submit(settlement(record(7)))
    await writer.close()
    stored = await stream_records(store)
    assert [r.request_id for r in stored] == ["req-7", "req-7"]
    assert len({r.record_id for r in stored}) == 2


async def test_aggregates_agree_with_the_records(store: Store) -> None:
    rng = random.Random(4)
    base = 1_790_000_000.0  # hours and days in the past, several of each
    recs = [
        record(i, key=rng.choice(["key_a", "key_b", "key_c"]), org=rng.choice(["acme", "globex", None]),
               started=base + rng.uniform(0, 3 * 86400), status=rng.choice([200, 200, 200, 499, 500, 502]),
               prompt=rng.randint(0, 50), completion=rng.randint(0, 200))
        for i in range(600)
    ]  # fmt: skip
    writer = UsageWriter(store)
    writer.start()
    for rec in recs:
        writer.submit(settlement(rec))
    await writer.close()
    stored = await stream_records(store)
    assert len(stored) == 600
    expected: dict[str, Counter[str]] = {}
    for rec in stored:
        for redis_key in rec.aggregate_keys():
            acc = expected.setdefault(redis_key, Counter())
            acc["requests"] += 1
            acc["prompt_tokens"] += rec.prompt_tokens
            acc["completion_tokens"] += rec.completion_tokens
            acc["errors"] += rec.status >= 400
            acc["unpriced"] += rec.price_id == ""  # these records carry no price
    found = [k.decode() async for k in store.redis.scan_iter(match=names.usage_aggregate("*", "*", "*"))]
    assert sorted(found) == sorted(expected)
    for redis_key, acc in expected.items():
        raw = await store.redis.hgetall(redis_key)
        columns = ("requests", "prompt_tokens", "completion_tokens", "errors", "unpriced")
        assert {k.decode(): int(v) for k, v in raw.items()} == {c: acc[c] for c in columns}
    # Each day's index names exactly the keys and orgs that had usage on it.
    for day in {r.periods()[1][2:] for r in stored}:
        members = {m.decode() for m in await store.redis.smembers(day_index(day))}
        on_day = [r for r in stored if r.periods()[1][2:] == day]
        assert members == {f"key:{r.key_id}" for r in on_day} | {f"org:{r.org}" for r in on_day if r.org}


async def test_stream_retention(store: Store) -> None:
    writer = UsageWriter(store, stream_maxlen=200)
    writer.start()
    for i in range(2000):
        writer.submit(settlement(record(i)))
    await writer.close()
    length = await store.redis.xlen(names.USAGE_STREAM)
    assert 200 <= length < 400  # `MAXLEN ~`: trimmed in whole stream nodes, never below the setting
    last = await store.redis.xrevrange(names.USAGE_STREAM, count=1)
    assert last[0][1][b"request_id"] == b"req-1999"
    # The aggregates keep counting what the stream no longer holds.
    agg = await store.redis.hgetall(names.usage_aggregate("key", "key_a", record(0).periods()[1]))
    assert int(agg[b"requests"]) == 2000


async def test_outage_spools_then_replays_in_order_exactly_once(
    store: Store, durable_redis: PersistentRedis, tmp_path: Path
) -> None:
    path = tmp_path / "u.spool"
    written, gauge = Written(), list[int]()
    writer = UsageWriter(store, spool=FileSpool(path), on_written=written, on_pending=gauge.append)
    writer.start()
    before = [record(i) for i in range(50)]
    for rec in before:
        writer.submit(settlement(rec))
    await until(lambda: _true(writer.pending == 0), what="the first records")
    durable_redis.stop()
    during = [record(i) for i in range(50, 350)]
    try:
        for i, rec in enumerate(during):
            writer.submit(settlement(rec))
            if i % 50 == 0:
                await asyncio.sleep(0.05)
        await until(lambda: _true(writer.spooled == 300), what="the spool")
        lines = path.read_bytes().splitlines()
        assert len(lines) == 300  # one checksummed JSON line per record, in submission order
        assert [UsageRecord.from_json(line[9:]).request_id for line in lines] == [r.request_id for r in during]
        assert max(gauge) >= 300
    finally:
        durable_redis.start()
    await until(lambda: _true(writer.pending == 0), what="the replay")
    stored = await stream_records(store)
    assert [r.request_id for r in stored] == [r.request_id for r in before + during]  # in order, once
    assert path.stat().st_size == 0 and gauge[-1] == 0
    assert sorted(r.record_id for r in written.records) == sorted(r.record_id for r in before + during)
    await writer.close()
    assert not path.exists()


async def test_stop_while_the_store_is_down_spools_everything_for_the_next_process(
    store: Store, durable_redis: PersistentRedis, tmp_path: Path
) -> None:
    path = tmp_path / "u.spool"
    writer = UsageWriter(store, spool=FileSpool(path, fsync="always"))
    writer.start()
    durable_redis.stop()
    try:
        recs = [record(i) for i in range(120)]
        for rec in recs:
            writer.submit(settlement(rec))
        lease = Settlement(["k"], [0, "m"], None)  # a lease release alone: not spooled, it expires
        writer.submit(lease)
        started = time.monotonic()
        await writer.close(timeout=5.0)
        assert time.monotonic() - started < 3.0  # does not wait out the close timeout on a dead store
        look = FileSpool(path)
        assert look.recover() == 120
        look.close()
    finally:
        durable_redis.start()
    written = Written()
    successor = UsageWriter(store, spool=FileSpool(path), on_written=written)
    successor.start()
    await until(lambda: _true(successor.pending == 0), what="the replay at start-up")
    await successor.close()
    assert [r.request_id for r in await stream_records(store)] == [r.request_id for r in recs]
    assert len(written.records) == 120
    assert not path.exists()


async def test_truncated_spool_and_records_already_stored_are_recovered_at_start_up(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash after writing records but before the spool was truncated, then a power loss in
    the middle of the last line: the next writer stores each record once and skips the torn line."""
    recs = [record(i) for i in range(30)]
    first = UsageWriter(store)
    first.start()
    for rec in recs[:10]:
        first.submit(settlement(rec))
    await first.close()
    path = tmp_path / "u.spool"
    path.write_bytes(b"".join(frame(r.to_json()) for r in recs) + frame(record(99).to_json())[:40])
    written = Written()
    writer = UsageWriter(store, spool=FileSpool(path), on_written=written)
    writer.start()
    await until(lambda: _true(writer.pending == 0), what="the replay")
    await writer.close()
    assert [r.request_id for r in await stream_records(store)] == [r.request_id for r in recs]
    assert len(written.records) == 20  # the 10 already stored were neither duplicated nor counted again
    assert "usage_spool_torn_tail" in capsys.readouterr().out
    assert not path.exists()


async def test_scripts_lost_by_a_restart_are_reloaded(store: Store, durable_redis: PersistentRedis) -> None:
    writer = UsageWriter(store)
    writer.start()
    writer.submit(settlement(record(1)))
    await until(lambda: _true(writer.pending == 0))
    client = durable_redis.client()
    client.script_flush()
    client.close()
    writer.submit(settlement(record(2)))
    await until(lambda: _true(writer.pending == 0))
    await writer.close()
    assert [r.request_id for r in await stream_records(store)] == ["req-1", "req-2"]


async def test_memory_only_writer_keeps_records_through_an_outage(
    store: Store, durable_redis: PersistentRedis
) -> None:
    writer = UsageWriter(store)  # no spool file: records wait in memory
    writer.start()
    durable_redis.stop()
    try:
        for i in range(10):
            writer.submit(settlement(record(i)))
        await until(lambda: _true(writer.spooled == 10))
    finally:
        durable_redis.start()
    await until(lambda: _true(writer.pending == 0))
    await writer.close()
    assert len(await stream_records(store)) == 10


async def test_close_on_a_hung_store_spools_the_batch_in_flight(
    store: Store, durable_redis: PersistentRedis, tmp_path: Path
) -> None:
    """Redis accepts connections but never answers (the process is paused): `close()` gives up
    after its timeout and spools every record, the batch stuck in a pipeline included."""
    path = tmp_path / "u.spool"
    writer = UsageWriter(store, spool=FileSpool(path))
    writer.start()
    await until(lambda: _true(writer.pending == 0), what="start-up")
    assert durable_redis.process is not None
    os.kill(durable_redis.process.pid, signal.SIGSTOP)
    try:
        recs = [record(i) for i in range(30)]
        for rec in recs:
            writer.submit(settlement(rec))
        await asyncio.sleep(0.2)  # the writer now waits on the paused server
        started = time.monotonic()
        await writer.close(timeout=0.5)
        assert time.monotonic() - started < 1.5
        look = FileSpool(path)
        assert look.recover() == 30
        look.close()
    finally:
        os.kill(durable_redis.process.pid, signal.SIGCONT)
    # Whatever the paused server ran once it woke up, a replay writes each record once.
    successor = UsageWriter(store, spool=FileSpool(path))
    successor.start()
    await until(lambda: _true(successor.pending == 0), what="the replay")
    await successor.close()
    assert sorted(r.request_id for r in await stream_records(store)) == sorted(r.request_id for r in recs)


async def test_close_right_after_a_store_restart_writes_instead_of_spooling(
    store: Store, durable_redis: PersistentRedis, tmp_path: Path
) -> None:
    """The pool's connections died with the restarted server, so the first write fails: `close()`
    tries again rather than leaving the record in the spool of a healthy store."""
    path = tmp_path / "u.spool"
    writer = UsageWriter(store, spool=FileSpool(path))
    writer.start()
    writer.submit(settlement(record(1)))
    await until(lambda: _true(writer.pending == 0), what="the first record")
    await asyncio.to_thread(durable_redis.stop)
    await asyncio.to_thread(durable_redis.start)
    writer.submit(settlement(record(2)))
    await writer.close()
    assert [r.request_id for r in await stream_records(store)] == ["req-1", "req-2"]
    assert not path.exists()
