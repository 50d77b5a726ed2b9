#!/usr/bin/env python3
"""A billing sink for Liutong Gateway: read the usage stream with a Redis consumer group and
write one CSV file per UTC day, so that usage flows to a warehouse without polling exports.

    pip install redis
    python examples/usage_consumer.py --redis-url redis://127.0.0.1:6379/0 --out-dir ./usage

The gateway appends one entry per request to the stream `liutong:{usage}:records` (fields:
request_id, key_id, org, model, status, stream, prompt_tokens, completion_tokens, total_tokens,
usage_source, started_at, duration_ms, record_id). This consumer:

1. creates its consumer group once (`XGROUP CREATE … MKSTREAM`; `--start-id 0` reads every
   record the stream still holds, `$` only new ones);
2. takes over what a crashed consumer of the group had read but not acknowledged
   (`XAUTOCLAIM`, entries idle for `--claim-idle-ms`), its own unacknowledged entries after a
   restart included;
3. reads new entries (`XREADGROUP … >`), appends them to `usage-YYYY-MM-DD.csv` (the UTC day
   the request started), flushes and fsyncs the files, and only then acknowledges them (`XACK`).

Delivery is at least once: a crash between the fsync and the XACK delivers those entries again.
Each record carries a unique `record_id`, and a row whose record_id is already in its day's file
is skipped, so the CSV files hold every record exactly once. (Deduplicate on `record_id`, not
`request_id`: a client may reuse its `x-request-id`, and each request is billed.) Entries that
the stream's retention trimmed before they were read are acknowledged and reported.

Run one consumer per process with a distinct `--consumer` name (the default is host + pid);
several consumers of one group share the work. `--once` exits when nothing is left to read
(for cron jobs and tests); otherwise it blocks for new entries until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

STREAM = "liutong:{usage}:records"
COLUMNS = (
    "request_id", "key_id", "org", "model", "status", "stream", "prompt_tokens", "completion_tokens",
    "total_tokens", "usage_source", "started_at", "duration_ms", "record_id",
)  # fmt: skip

Entry = tuple[str, dict[str, str] | None]


class DailyCsv:
    """`usage-YYYY-MM-DD.csv` files in `directory`, each with the record ids it already holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, set[str]] = {}

    def path(self, day: str) -> Path:
        return self.directory / f"usage-{day}.csv"

    def _ids(self, day: str) -> set[str]:
        if day not in self._seen:
            ids: set[str] = set()
            path = self.path(day)
            if path.exists():
                with path.open(newline="", encoding="utf-8") as fh:
                    ids = {row["record_id"] for row in csv.DictReader(fh)}
            self._seen[day] = ids
        return self._seen[day]

    def append(self, records: Iterable[dict[str, str]]) -> int:
        """Write the records not written yet, durably; how many were new."""
        by_day: dict[str, list[dict[str, str]]] = defaultdict(list)
        for record in records:
            by_day[day_of(record)].append(record)
        written = 0
        for day, rows in sorted(by_day.items()):
            ids = self._ids(day)
            fresh = []
            for row in rows:
                if row["record_id"] not in ids:
                    ids.add(row["record_id"])
                    fresh.append(row)
            if not fresh:
                continue
            path = self.path(day)
            new_file = not path.exists() or path.stat().st_size == 0
            with path.open("a", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                if new_file:
                    writer.writerow(COLUMNS)
                writer.writerows([[row.get(c, "") for c in COLUMNS] for row in fresh])
                fh.flush()
                os.fsync(fh.fileno())
            written += len(fresh)
        return written


def day_of(record: dict[str, str]) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(float(record["_epoch"])))


def as_record(fields: dict[Any, Any]) -> dict[str, str]:
    """A stream entry's fields as a CSV row: `started_at` in ISO 8601 (UTC, milliseconds)."""
    record = {_text(k): _text(v) for k, v in fields.items()}
    seconds, millis = divmod(round(float(record["started_at"]) * 1000), 1000)
    record["_epoch"] = record["started_at"]
    record["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
    return record


class Consumer:
    def __init__(self, client: redis.Redis, sink: DailyCsv, *, group: str, name: str, stream: str = STREAM,
                 batch: int = 500, block_ms: int = 5000, claim_idle_ms: int = 60_000) -> None:  # fmt: skip
        self.client, self.sink = client, sink
        self.group, self.name, self.stream = group, name, stream
        self.batch, self.block_ms, self.claim_idle_ms = batch, block_ms, claim_idle_ms
        self.stopping = False
        self.written = self.acked = self.trimmed = 0

    def ensure_group(self, start_id: str) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def handle(self, entries: list[Entry]) -> None:
        """Write the entries' records durably, then acknowledge every entry."""
        if not entries:
            return
        records = []
        for _, fields in entries:
            if fields:
                records.append(as_record(fields))
            else:
                self.trimmed += 1  # trimmed by retention before it was read: nothing to write
        self.written += self.sink.append(records)
        self.acked += self.client.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])

    def claim(self) -> int:
        """Take over entries another consumer (or this one, before a restart) left unacknowledged."""
        start, claimed = "0-0", 0
        while True:
            reply: Any = self.client.xautoclaim(self.stream, self.group, self.name, self.claim_idle_ms,
                                                start_id=start, count=self.batch)  # fmt: skip
            start, entries = _text(reply[0]), reply[1]
            deleted = reply[2] if len(reply) > 2 else []  # Redis ≥ 7: entries trimmed while pending
            if deleted:  # trimmed away while pending: acknowledge them so they stop being pending
                self.trimmed += len(deleted)
                self.client.xack(self.stream, self.group, *deleted)
            self.handle([(_text(i), f) for i, f in entries])
            claimed += len(entries)
            if start == "0-0":
                return claimed

    def read(self, block: bool) -> int:
        reply: Any = self.client.xreadgroup(self.group, self.name, {self.stream: ">"}, count=self.batch,
                                            block=self.block_ms if block else None)  # fmt: skip
        streams = reply.items() if isinstance(reply, dict) else (reply or [])  # RESP3 or RESP2
        entries = [(_text(i), f) for _, stream_entries in streams for i, f in stream_entries]
        self.handle(entries)
        return len(entries)

    def run(self, *, once: bool) -> None:
        self.claim()
        last_claim = time.monotonic()
        while not self.stopping:
            got = self.read(block=not once)
            if time.monotonic() - last_claim > self.claim_idle_ms / 1000:
                got += self.claim()
                last_claim = time.monotonic()
            if once and not got:
                return


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("LIUTONG_REDIS_URL"), help="default: $LIUTONG_REDIS_URL")
    parser.add_argument("--out-dir", type=Path, default=Path("usage"))
    parser.add_argument("--group", default="billing")
    parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--stream", default=STREAM)
    parser.add_argument("--start-id", default="0", help="where a new group starts: 0 (all retained) or $ (new)")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--block-ms", type=int, default=5000)
    parser.add_argument("--claim-idle-ms", type=int, default=60_000,
                        help="take over entries another consumer left unacknowledged this long")  # fmt: skip
    parser.add_argument("--once", action="store_true", help="exit when nothing is left to read")
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("argument --redis-url: required (or set LIUTONG_REDIS_URL)")
    client = redis.Redis.from_url(args.redis_url, socket_timeout=max(10.0, args.block_ms / 1000 + 5))
    consumer = Consumer(client, DailyCsv(args.out_dir), group=args.group, name=args.consumer, stream=args.stream,
                        batch=args.batch, block_ms=args.block_ms, claim_idle_ms=args.claim_idle_ms)  # fmt: skip

    def stop(*_: Any) -> None:
        consumer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        consumer.ensure_group(args.start_id)
        consumer.run(once=args.once)
    except redis.RedisError as exc:
        print(f"usage_consumer: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    trimmed = f", {consumer.trimmed} trimmed before they were read" if consumer.trimmed else ""
    print(f"usage_consumer: wrote {consumer.written} records, acknowledged {consumer.acked} entries{trimmed}",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
