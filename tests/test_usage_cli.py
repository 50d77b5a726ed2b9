"""`liutong-gateway usage export|summary` (CONTRACT §5, §8) run as a user runs them, against the
session's real `redis-server`: filters, formats, summaries that agree with the records, bad
arguments (exit 2 naming the argument), and an export of 100,000 records in bounded memory.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.store import names
from gateway.store.client import Store, open_store
from gateway.usage.export import EXPORT_FIELDS, when
from gateway.usage.records import Settlement, UsageRecord
from gateway.usage.writer import UsageWriter
from tests.test_cli import clean_env, ok, run_cli

# Records span three days that ended a week ago, whatever today is: a fixed date would leave the
# --slack window of the export tests behind as the calendar moves on.
T0 = (datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=10)).timestamp()
HOUR = 3600.0


def utc_day(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d")


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    s = open_store(redis_url, timeout=2.0)
    await s.load_scripts()
    yield s
    await s.close()


@pytest.fixture
async def records(store: Store) -> list[UsageRecord]:
    rng = random.Random(11)
    recs = [
        UsageRecord(
            request_id=f"req-{i}", key_id=rng.choice(["key_a", "key_b"]), org=rng.choice(["acme", None]),
            model="crimson-falcon-4", status=rng.choice([200, 200, 200, 499, 502]), stream=rng.random() < 0.5,
            prompt_tokens=rng.randint(1, 30), completion_tokens=rng.randint(0, 60),
            usage_source=rng.choice(["upstream", "estimated"]), started_at=T0 + rng.uniform(0, 60 * HOUR),
            duration_ms=rng.randint(1, 5000),
        )
        for i in range(400)
    ]  # fmt: skip
    writer = UsageWriter(store)
    writer.start()
    for rec in recs:
        writer.submit(Settlement([], [], rec, [True, False]))
    await writer.close()
    return recs


def selected(recs: list[UsageRecord], since: float, until: float, key: str | None = None,
             org: str | None = None) -> list[UsageRecord]:  # fmt: skip
    return [r for r in recs if since <= round(r.started_at, 3) < until and (key is None or r.key_id == key)
            and (org is None or r.org == org)]  # fmt: skip


def test_time_arguments() -> None:
    assert when("2026-11-25T10:00:00Z") == datetime(2026, 11, 25, 10, tzinfo=UTC).timestamp()
    assert when("2026-11-25T12:00:00+02:00") == datetime(2026, 11, 25, 10, tzinfo=UTC).timestamp()
    assert when("2026-11-25") == datetime(2026, 11, 25, tzinfo=UTC).timestamp()  # UTC when no offset
    assert when("90m", now=10_000.0) == 10_000.0 - 5400
    assert when("2h", now=10_000.0) == 10_000.0 - 7200 and when("7d", now=1e6) == 1e6 - 7 * 86400


async def test_export_jsonl_filters_by_started_at_key_and_org(redis_url: str, records: list[UsageRecord]) -> None:
    since, until = T0 + 6 * HOUR, T0 + 30 * HOUR
    # These records were written days after they started: --slack must reach from --until to now.
    args = ("usage", "export", "--since", iso(since), "--until", iso(until), "--slack", "30d")
    out = ok(run_cli(*args, redis_url=redis_url)).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    want = selected(records, since, until)
    assert [r["request_id"] for r in lines] == [r.request_id for r in want]  # in write order
    first, rec = lines[0], want[0]
    assert list(first) == list(EXPORT_FIELDS)
    assert first["total_tokens"] == rec.prompt_tokens + rec.completion_tokens
    assert first["stream"] is rec.stream and first["status"] == rec.status and first["org"] == rec.org
    assert first["started_at"].endswith("Z") and datetime.fromisoformat(first["started_at"]).timestamp() == round(
        rec.started_at, 3
    )
    out = ok(run_cli("usage", "export", "--key", "key_b", "--org", "acme", redis_url=redis_url)).stdout
    assert [json.loads(x)["request_id"] for x in out.splitlines()] == [
        r.request_id for r in records if r.key_id == "key_b" and r.org == "acme"
    ]
    # Without --since/--until: everything; an age reaches back from now.
    assert len(ok(run_cli("usage", "export", redis_url=redis_url)).stdout.splitlines()) == 400
    assert ok(run_cli("usage", "export", "--since", "1h", redis_url=redis_url)).stdout == ""


async def test_export_csv(redis_url: str, records: list[UsageRecord]) -> None:
    out = ok(run_cli("usage", "export", "--format", "csv", "--org", "acme", redis_url=redis_url)).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    want = [r for r in records if r.org == "acme"]
    assert out.splitlines()[0] == ",".join(EXPORT_FIELDS)
    assert [r["request_id"] for r in rows] == [r.request_id for r in want]
    assert sum(int(r["completion_tokens"]) for r in rows) == sum(r.completion_tokens for r in want)
    assert {r["stream"] for r in rows} <= {"True", "False"}


async def test_export_sees_records_written_long_after_they_started(redis_url: str, store: Store) -> None:
    """A record replayed from a spool hours later: its stream ID is the write time, the filter
    is on started_at; the scan covers --slack (1 day by default) after --until."""
    late = UsageRecord("late-1", "key_a", None, "m", 200, False, 1, 1, "upstream", time.time() - 5 * HOUR, 10)
    writer = UsageWriter(store)
    writer.start()
    writer.submit(Settlement([], [], late, [True, False]))
    await writer.close()
    args = ("usage", "export", "--since", "6h", "--until", "4h")
    assert json.loads(ok(run_cli(*args, redis_url=redis_url)).stdout)["request_id"] == "late-1"
    assert ok(run_cli(*args, "--slack", "1h", redis_url=redis_url)).stdout == ""  # written after until + slack


async def test_summary_agrees_with_the_records(redis_url: str, records: list[UsageRecord]) -> None:
    since, until = T0 + 5 * HOUR, T0 + 53 * HOUR  # partial first and last day, one whole day
    args = ("usage", "summary", "--since", iso(since), "--until", iso(until), "--json")
    data = json.loads(ok(run_cli(*args, redis_url=redis_url)).stdout)
    assert data["since"] == iso(since) and data["until"] == iso(until) and data["by"] == "day"
    want: dict[tuple[str, str, str], Counter[str]] = {}
    for r in selected(records, since, until):
        day = datetime.fromtimestamp(r.started_at, UTC).strftime("%Y-%m-%d")
        for scope, name in (("key", r.key_id), ("org", r.org)):
            if name is None:
                continue
            acc = want.setdefault((scope, name, day), Counter())
            acc["requests"] += 1
            acc["errors"] += r.status >= 400
            acc["prompt_tokens"] += r.prompt_tokens
            acc["completion_tokens"] += r.completion_tokens
    got = {(row["scope"], row["name"], row["period"]): row for row in data["rows"]}
    assert set(got) == set(want)
    for k, acc in want.items():
        row = got[k]
        assert (row["requests"], row["errors"], row["prompt_tokens"], row["completion_tokens"]) == (
            acc["requests"], acc["errors"], acc["prompt_tokens"], acc["completion_tokens"])  # fmt: skip
        assert row["total_tokens"] == acc["prompt_tokens"] + acc["completion_tokens"]
    # --by total and --key: one row; --by hour: rows per hour that add up to it.
    key_args = ("usage", "summary", "--since", iso(since), "--until", iso(until), "--key", "key_a", "--json")
    (total,) = json.loads(ok(run_cli(*key_args, "--by", "total", redis_url=redis_url)).stdout)["rows"]
    hourly = json.loads(ok(run_cli(*key_args, "--by", "hour", redis_url=redis_url)).stdout)["rows"]
    assert total["requests"] == len(selected(records, since, until, key="key_a")) == sum(r["requests"] for r in hourly)
    assert total["completion_tokens"] == sum(r["completion_tokens"] for r in hourly)
    assert all(r["period"].endswith(":00Z") for r in hourly)
    # The table.
    table = ok(run_cli("usage", "summary", "--since", iso(since), "--until", iso(until), "--org", "acme",
                       redis_url=redis_url)).stdout.splitlines()  # fmt: skip
    assert table[1].split() == ["SCOPE", "NAME", "PERIOD", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL", "COST"]
    assert [line.split()[:3] for line in table[2:-1]] == [["org", "acme", utc_day(T0 + d * 24 * HOUR)] for d in
                                                          range(3)]  # fmt: skip
    # These records carry no price: cost 0, flagged.
    assert all(line.split()[-1] == "0.00*" for line in table[2:-1]) and table[-1].startswith("* includes")
    empty = ok(run_cli("usage", "summary", redis_url=redis_url)).stdout  # default: today, none yet
    assert "no usage" in empty


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("export", "--since", "yesterday"), "--since"),
        (("export", "--until", "2026-13-01"), "--until"),
        (("export", "--format", "xml"), "--format"),
        (("export", "--slack", "soon"), "--slack"),
        (("summary", "--by", "week"), "--by"),
        (("summary", "--since", "1h", "--until", "2h"), "--since"),
        (("export", "--bogus"), "--bogus"),
    ],
)
def test_bad_arguments_exit_2(redis_url: str, args: tuple[str, ...], names: str) -> None:
    result = run_cli("usage", *args, redis_url=redis_url)
    assert result.returncode == 2, result
    assert names in result.stderr and "Traceback" not in result.stderr


def test_no_store_exit_2_and_unreachable_store_exit_1() -> None:
    result = run_cli("usage", "export", env=clean_env())
    assert result.returncode == 2 and "LIUTONG_REDIS_URL" in result.stderr
    result = run_cli("usage", "summary", "--redis-url", "redis://127.0.0.1:1/0", env=clean_env())
    assert result.returncode == 1 and "unreachable" in result.stderr and "Traceback" not in result.stderr


_RSS_WRAPPER = (
    "import resource, sys; from gateway.cli import main; rc = main(sys.argv[1:]); sys.stdout.flush(); "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def _export_peak_rss_kib(redis_url: str, out: Path, *args: str) -> int:
    with out.open("wb") as fh:
        result = subprocess.run(
            [sys.executable, "-c", _RSS_WRAPPER, "usage", "export", *args],
            stdout=fh, stderr=subprocess.PIPE, env=clean_env(LIUTONG_REDIS_URL=redis_url), timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stderr.decode().split()[-1])


async def test_export_of_100k_records_runs_in_bounded_memory(redis_url: str, store: Store, tmp_path: Path) -> None:
    template = UsageRecord("x", "key_big", "acme", "crimson-falcon-4", 200, True, 12, 34, "upstream", T0, 250)
    fill = store.redis.register_script(
        "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do ARGV[4] = 'big-' .. i; ARGV[28] = 'rec_' .. i; "
        "redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3, 28)) end"
    )
    for start in range(0, 100_000, 10_000):
        await fill(keys=[names.USAGE_STREAM], args=[start, start + 9_999, *template.fields()])
    small = _export_peak_rss_kib(redis_url, tmp_path / "small.jsonl", "--until", iso(T0 + 1), "--key", "nobody")
    started = time.monotonic()
    big = _export_peak_rss_kib(redis_url, tmp_path / "big.jsonl")
    elapsed = time.monotonic() - started
    with (tmp_path / "big.jsonl").open("rb") as fh:
        count = sum(1 for _ in fh)
    assert count == 100_000
    print(f"usage export of 100,000 records: peak RSS {big / 1024:.1f} MiB "
          f"(an export of nothing: {small / 1024:.1f} MiB), {elapsed:.1f} s")  # fmt: skip
    assert big - small < 16 * 1024, (big, small)  # the records themselves would take ~40 MiB
