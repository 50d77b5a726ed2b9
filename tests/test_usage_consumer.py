"""`examples/usage_consumer.py`, the billing sink, against a real `redis-server`: a consumer group
reads the usage stream into daily CSV files, takes over what a crashed consumer had read but not
acknowledged (XAUTOCLAIM), and writes every record exactly once even when entries are delivered
again after a crash between the CSV write and the XACK.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from gateway.store import names
from gateway.store.client import Store, open_store
from gateway.usage.records import Settlement, UsageRecord
from gateway.usage.writer import UsageWriter
from tests.conftest import REPO
from tests.test_cli import clean_env

SCRIPT = REPO / "examples" / "usage_consumer.py"
DAY1 = datetime(2026, 11, 23, tzinfo=UTC).timestamp()


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("usage_consumer", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    s = open_store(redis_url, timeout=2.0)
    await s.load_scripts()
    yield s
    await s.close()


async def write_records(store: Store, first: int, count: int) -> list[UsageRecord]:
    rng = random.Random(first)
    recs = [
        UsageRecord(f"req-{i}", rng.choice(["key_a", "key_b"]), "acme", "indigo-owl-4", 200, False,
                    rng.randint(1, 20), rng.randint(0, 50), "upstream", DAY1 + rng.uniform(0, 2 * 86400), 7)
        for i in range(first, first + count)
    ]  # fmt: skip
    writer = UsageWriter(store)
    writer.start()
    for rec in recs:
        writer.submit(Settlement([], [], rec, [True, False]))
    await writer.close()
    return recs


def run_consumer(redis_url: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--redis-url", redis_url, "--out-dir", str(out), "--once", "--batch", "64",
         "--consumer", "billing-1", *args],
        capture_output=True, encoding="utf-8", env=clean_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def csv_rows(out: Path) -> dict[str, list[dict[str, str]]]:
    files: dict[str, list[dict[str, str]]] = {}
    for path in sorted(out.glob("usage-*.csv")):
        with path.open(newline="", encoding="utf-8") as fh:
            files[path.name] = list(csv.DictReader(fh))
    return files


def check(files: dict[str, list[dict[str, str]]], recs: list[UsageRecord]) -> None:
    rows = [row for day_rows in files.values() for row in day_rows]
    assert sorted(r["record_id"] for r in rows) == sorted(r.record_id for r in recs)  # each once
    assert sum(int(r["completion_tokens"]) for r in rows) == sum(r.completion_tokens for r in recs)
    for name, day_rows in files.items():
        assert all(name == f"usage-{r['started_at'][:10]}.csv" for r in day_rows)


async def test_consumer_group_to_daily_csv_with_crash_recovery(redis_url: str, store: Store, tmp_path: Path) -> None:
    recs = await write_records(store, 0, 300)
    out = tmp_path / "csv"
    example = load_example()
    # A consumer of the group reads 100 entries, writes 40 of them to the CSV, and crashes
    # before acknowledging anything.
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(names.USAGE_STREAM, "billing", id="0")
    reply: Any = client.xreadgroup("billing", "crashed", {names.USAGE_STREAM: ">"}, count=100)
    read = reply[0][1]
    example.DailyCsv(out).append([example.as_record(fields) for _, fields in read[:40]])
    assert client.xpending(names.USAGE_STREAM, "billing")["pending"] == 100

    result = run_consumer(redis_url, out, "--claim-idle-ms", "0")
    assert "wrote 260 records, acknowledged 300 entries" in result.stderr
    check(csv_rows(out), recs)
    assert client.xpending(names.USAGE_STREAM, "billing")["pending"] == 0
    assert set(csv_rows(out)) == {"usage-2026-11-23.csv", "usage-2026-11-24.csv"}

    # Later records are appended; what was acknowledged is not read again.
    more = await write_records(store, 300, 50)
    result = run_consumer(redis_url, out)
    assert "wrote 50 records, acknowledged 50 entries" in result.stderr
    check(csv_rows(out), recs + more)
    header = (out / "usage-2026-11-23.csv").read_text().splitlines()[0]
    assert header == ",".join(example.COLUMNS)
    client.close()


async def test_consumer_acknowledges_entries_trimmed_before_it_read_them(
    redis_url: str, store: Store, tmp_path: Path
) -> None:
    await write_records(store, 0, 20)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(names.USAGE_STREAM, "billing", id="0")
    client.xreadgroup("billing", "crashed", {names.USAGE_STREAM: ">"}, count=10)
    client.xtrim(names.USAGE_STREAM, maxlen=5, approximate=False)  # retention removed 15 entries, 10 of them pending
    result = run_consumer(redis_url, tmp_path / "csv", "--claim-idle-ms", "0")
    assert "wrote 5 records" in result.stderr and "10 trimmed" in result.stderr
    assert client.xpending(names.USAGE_STREAM, "billing")["pending"] == 0
    client.close()


def test_consumer_without_redis_url_exits_2() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--once"], capture_output=True, encoding="utf-8",
                            env=clean_env(), timeout=30)  # fmt: skip
    assert result.returncode == 2 and "--redis-url" in result.stderr
