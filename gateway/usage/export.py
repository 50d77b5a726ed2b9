"""`liutong-gateway usage export|summary`: the usage records and aggregates read back (CONTRACT §5).

`export` streams the records of the usage stream to stdout, JSON lines or CSV, a page of
`XRANGE` at a time, so that memory stays flat however many records match. Stream IDs are the
store's clock at write time, while a record is filtered on its `started_at` (the gateway's
clock when the request arrived): the scan starts `SKEW` before `--since` (clock skew between
hosts) and ends `--slack` (default 1 day) after `--until`, to catch long requests and records
that waited in a spool. `summary` sums the hourly and daily aggregates that `record_usage.lua`
keeps per key and per org, over whole UTC hours, as a table (or `--json`).

A time `T` is ISO 8601 (`2026-11-25T10:00:00Z`, `2026-11-25`; UTC unless an offset is given)
or an age (`90m`, `2h`, `7d`: that long ago). Bad arguments exit 2 naming the argument.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from redis.exceptions import RedisError

from gateway.config import Settings
from gateway.store import names
from gateway.store.client import Store, lua_source, open_store
from gateway.usage.pricing import money_text
from gateway.usage.records import FIELDS, UsageRecord, day_index

PAGE = 1000
SKEW = 300.0  # seconds: clock skew allowed between a gateway host and the store
DEFAULT_SLACK = 86400.0
_AGE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros", "unpriced")
# The exported columns: the record's fields, then its cost as decimal text of its currency.
EXPORT_FIELDS = (*FIELDS, "cost")


def when(text: str, *, now: float | None = None) -> float:
    """ISO 8601 or an age (`90m`, `2h`, `7d`) → epoch seconds (argparse type)."""
    text = text.strip()
    match = _AGE.fullmatch(text)
    if match:
        return (time.time() if now is None else now) - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ISO 8601 like 2026-11-25T10:00:00Z or an age like 90m, 2h, 7d, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def span(text: str) -> float:
    match = _AGE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 90m, 2h, 7d, got {text!r}")
    return float(int(match.group(1)) * _UNITS[match.group(2)])


def iso(epoch: float, *, ms: bool = True) -> str:
    """`2026-11-25T10:00:00.123Z` (UTC; without the milliseconds when `ms` is false)."""
    seconds, millis = divmod(round(epoch * 1000), 1000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{millis:03d}Z" if ms else text + "Z"


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """The `usage` command and its actions, under the CLI's sub-parsers."""
    usage = commands.add_parser("usage", help="read usage records and aggregates")
    actions = usage.add_subparsers(dest="action", required=True, metavar="ACTION")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--since", type=when, help="ISO 8601 time or an age (90m, 2h, 7d)")
        p.add_argument("--until", type=when, help="ISO 8601 time or an age (default: now)")
        p.add_argument("--key", metavar="KEY_ID", help="only this key")
        p.add_argument("--org", help="only this org")

    export = actions.add_parser("export", parents=[common], help="write usage records to stdout")
    filters(export)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--slack", type=span, default=DEFAULT_SLACK,
                        help="how long after --until a record may have been written (default 1d)")  # fmt: skip
    summary = actions.add_parser("summary", parents=[common], help="aggregates as a table")
    filters(summary)
    summary.add_argument("--by", choices=("hour", "day", "total"), default="day", help="one row per … (default day)")
    summary.add_argument("--json", action="store_true")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print(f"usage {args.action}: no store configured; set --redis-url or LIUTONG_REDIS_URL", file=sys.stderr)
        return 2
    now = time.time()
    if args.since is not None and args.until is not None and args.since >= args.until:
        print(f"usage {args.action}: argument --since: must be before --until", file=sys.stderr)
        return 2
    store = open_store(settings.redis_url, timeout=max(settings.store_timeout, 5.0))
    try:
        if args.action == "export":
            await export(store, sys.stdout.buffer, since=args.since, until=args.until, key=args.key, org=args.org,
                         fmt=args.format, slack=args.slack)  # fmt: skip
        else:
            since = args.since if args.since is not None else (now // 86400) * 86400
            until = args.until if args.until is not None else now
            rows = await summary(store, since=since, until=until, key=args.key, org=args.org, by=args.by)
            _print_summary(rows, since, until, args.by, args.json, settings)
    except BrokenPipeError:  # `usage export | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (RedisError, OSError) as exc:
        print(f"usage {args.action}: the store at the configured redis_url is unreachable ({exc})", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


# --- export ---------------------------------------------------------------------------------
# (The export reads pages through `export_page.lua`; XRANGE's exclusive start needs Redis ≥ 6.2.)


def record_dict(record: UsageRecord) -> dict[str, Any]:
    """A record as exported (the contract's fields; `started_at` in ISO 8601, UTC)."""
    return {
        "request_id": record.request_id, "key_id": record.key_id, "org": record.org, "model": record.model,
        "status": record.status, "stream": record.stream, "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens, "total_tokens": record.total_tokens,
        "usage_source": record.usage_source, "started_at": iso(record.started_at),
        "duration_ms": record.duration_ms, "record_id": record.record_id,
        "cached_tokens": record.cached_tokens, "cost_micros": record.cost_micros,
        "currency": record.currency or None, "price_id": record.price_id or None,
        "cost": money_text(record.cost_micros),
    }  # fmt: skip


async def scan(
    store: Store, *, since: float | None, until: float | None, slack: float = DEFAULT_SLACK, page: int = PAGE
) -> AsyncIterator[list[tuple[str, dict[str, str]]]]:
    """Yield the pages of stream entries (id, fields) that may hold records started in
    [since, until). `export_page.lua` sends each entry as one JSON string: parsing the plain
    XRANGE reply in pure Python costs ten times more than everything else an export does."""
    script = store.redis.register_script(lua_source("export_page"))
    start = "-" if since is None else f"{max(0, int((since - SKEW) * 1000))}-0"
    end = "+" if until is None else str(int((until + slack) * 1000))
    while True:
        rows = [orjson.loads(raw) for raw in await script(keys=[names.USAGE_STREAM], args=[start, end, page])]
        if not rows:
            return
        yield [(row[0], dict(zip(row[1::2], row[2::2], strict=True))) for row in rows]
        if len(rows) < page:
            return
        start = "(" + rows[-1][0]


async def export(
    store: Store,
    out: IO[bytes],
    *,
    since: float | None = None,
    until: float | None = None,
    key: str | None = None,
    org: str | None = None,
    fmt: str = "jsonl",
    slack: float = DEFAULT_SLACK,
) -> int:
    """Write the matching records to `out`, a page at a time; how many were written."""
    count = 0
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(EXPORT_FIELDS)
        out.write(text.getvalue().encode())
    async for entries in scan(store, since=since, until=until, slack=slack):
        lines: list[bytes] = []
        text.seek(0)
        text.truncate()
        for _, raw in entries:
            record = UsageRecord.from_fields(raw)
            if since is not None and record.started_at < since:
                continue
            if until is not None and record.started_at >= until:
                continue
            if (key is not None and record.key_id != key) or (org is not None and record.org != org):
                continue
            row = record_dict(record)
            if fmt == "csv":
                writer.writerow(["" if row[f] is None else row[f] for f in EXPORT_FIELDS])
            else:
                lines.append(orjson.dumps(row) + b"\n")
            count += 1
        out.write(text.getvalue().encode() if fmt == "csv" else b"".join(lines))
        out.flush()
    out.flush()
    return count


# --- summary --------------------------------------------------------------------------------

Row = dict[str, Any]


def _hours(since: float, until: float) -> list[int]:
    """Epoch hours (UTC) covering [since, until), rounded outward to whole hours."""
    first = int(since // 3600)
    last = int(-(-until // 3600))
    return list(range(first, max(last, first + 1)))


async def summary(
    store: Store, *, since: float, until: float, key: str | None = None, org: str | None = None, by: str = "day"
) -> list[Row]:
    """Aggregates per key and per org over [since, until) in whole hours, one row per `by`."""
    hours = _hours(since, until)
    days: dict[str, list[int]] = defaultdict(list)
    for hour in hours:
        days[time.strftime("%Y%m%d", time.gmtime(hour * 3600))].append(hour)
    scopes: list[tuple[str, str]] = []
    if key is not None:
        scopes.append(("key", key))
    if org is not None:
        scopes.append(("org", org))
    if not scopes:
        pipe = store.redis.pipeline(transaction=False)
        for day in days:
            pipe.smembers(day_index(day))
        found: set[str] = set()
        for members in await pipe.execute():
            found.update(m.decode() if isinstance(m, bytes) else m for m in members)
        for member in sorted(found):
            scope, _, name = member.partition(":")
            scopes.append((scope, name))
    # For each scope: the hashes to read, each with the period it counts towards.
    reads: list[tuple[str, str, str, str]] = []  # scope, name, period label, redis key
    for scope, name in scopes:
        for day, day_hours in days.items():
            label_day = f"{day[:4]}-{day[4:6]}-{day[6:]}"
            if by != "hour" and len(day_hours) == 24:
                reads.append((scope, name, label_day, names.usage_aggregate(scope, name, f"d:{day}")))
                continue
            for hour in day_hours:
                stamp = time.gmtime(hour * 3600)
                label = time.strftime("%Y-%m-%dT%H:00Z", stamp) if by == "hour" else label_day
                hourly = names.usage_aggregate(scope, name, time.strftime("h:%Y%m%d%H", stamp))
                reads.append((scope, name, label, hourly))
    totals: dict[tuple[str, str, str], dict[str, int]] = {}
    whole = f"{iso(hours[0] * 3600, ms=False)}/{iso((hours[-1] + 1) * 3600, ms=False)}"
    for chunk in _chunks(reads, 1000):
        pipe = store.redis.pipeline(transaction=False)
        for *_, redis_key in chunk:
            pipe.hgetall(redis_key)
        for (scope, name, label, _), raw in zip(chunk, await pipe.execute(), strict=True):
            if not raw:
                continue
            period = whole if by == "total" else label
            acc = totals.setdefault((scope, name, period), dict.fromkeys(_COLUMNS, 0))
            fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
            for column in _COLUMNS:
                acc[column] += int(fields.get(column) or 0)
    rows = []
    for (scope, name, period), acc in sorted(totals.items()):
        if acc["requests"]:
            rows.append({"scope": scope, "name": name, "period": period, **acc,
                         "total_tokens": acc["prompt_tokens"] + acc["completion_tokens"],
                         "cost": money_text(acc["cost_micros"])})  # fmt: skip
    return rows


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _print_summary(
    rows: list[Row], since: float, until: float, by: str, as_json: bool, settings: Settings | None = None
) -> None:
    hours = _hours(since, until)
    start, end = iso(hours[0] * 3600, ms=False), iso((hours[-1] + 1) * 3600, ms=False)
    pricing = settings.pricing if settings is not None else None
    currency = pricing.currency if pricing is not None else None
    # Models of the config that have no price: their requests count as 0 in `cost`.
    unpriced_models = pricing.unpriced(settings.models) if pricing is not None and settings is not None else []
    if as_json:
        sys.stdout.write(orjson.dumps({"since": start, "until": end, "by": by, "currency": currency,
                                       "unpriced_models": unpriced_models, "rows": rows}).decode() + "\n")  # fmt: skip
        return
    print(f"usage from {start} to {end} (whole UTC hours), by {by}" + (f", cost in {currency}" if currency else ""))
    header = ("SCOPE", "NAME", "PERIOD", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL", "COST")
    table = [header] + [
        (r["scope"], r["name"], r["period"], str(r["requests"]), str(r["errors"]), str(r["prompt_tokens"]),
         str(r["completion_tokens"]), str(r["total_tokens"]), r["cost"] + ("*" if r["unpriced"] else ""))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        print("  ".join(cells).rstrip())
    if not rows:
        print("(no usage in this period)")
    if any(r["unpriced"] for r in rows):
        models = f" ({', '.join(unpriced_models)} have none in the config)" if unpriced_models else ""
        print(f"* includes requests of models without a price, counted as 0{models}")
