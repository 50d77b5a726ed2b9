"""The usage record (CONTRACT §8): its fields, its stream form, its spool form, and the
settlement that ends a request in the store.

Each record carries a `record_id` made when the request ends; the script's idempotence marker
is named by it, so a retried write (a lost reply, a spool replay, a crash between the write
and the truncation of the spool) never duplicates a record, while two requests that reuse one
client-chosen `x-request-id` are still two records.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.store import names

# The record's fields, in the stream and in exports (CONTRACT §8, then the record id).
FIELDS = (
    "request_id", "key_id", "org", "model", "status", "stream", "prompt_tokens", "completion_tokens",
    "total_tokens", "usage_source", "started_at", "duration_ms", "record_id",
    "cached_tokens", "cost_micros", "currency", "price_id",
)  # fmt: skip

def new_record_id() -> str:
    return "rec_" + os.urandom(10).hex()


def day_index(day: str) -> str:
    """The set of `key:<key_id>` and `org:<org>` with usage on `day` (`YYYYMMDD`, UTC)."""
    return f"{names.PREFIX}{names.USAGE_TAG}:active:d:{day}"


@functools.lru_cache(maxsize=64)
def _periods(hour: int) -> tuple[str, str]:
    stamp = time.gmtime(hour * 3600)
    return time.strftime("h:%Y%m%d%H", stamp), time.strftime("d:%Y%m%d", stamp)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    key_id: str
    org: str | None
    model: str
    status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    usage_source: str  # "upstream" or "estimated"
    started_at: float  # epoch seconds
    duration_ms: int
    record_id: str = field(default_factory=new_record_id)
    # Spend (see usage/pricing.py): prompt tokens the upstream served from its cache, the cost in
    # integer micro-units of `currency`, and the price entry used ("" for a model without a price).
    cached_tokens: int = 0
    cost_micros: int = 0
    currency: str = ""
    price_id: str = ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def fields(self) -> list[str]:
        return [
            "request_id", self.request_id,
            "key_id", self.key_id,
            "org", self.org or "",
            "model", self.model,
            "status", str(self.status),
            "stream", "1" if self.stream else "0",
            "prompt_tokens", str(self.prompt_tokens),
            "completion_tokens", str(self.completion_tokens),
            "total_tokens", str(self.total_tokens),
            "usage_source", self.usage_source,
            "started_at", f"{self.started_at:.3f}",
            "duration_ms", str(self.duration_ms),
            "record_id", self.record_id,
            "cached_tokens", str(self.cached_tokens),
            "cost_micros", str(self.cost_micros),
            "currency", self.currency,
            "price_id", self.price_id,
        ]  # fmt: skip

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes] | dict[str, str]) -> UsageRecord:
        """A record read back from the stream (field names and values as bytes or str)."""
        data: dict[str, str] = raw  # type: ignore[assignment]
        if raw and isinstance(next(iter(raw)), bytes):
            data = {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]
        return cls(
            request_id=data["request_id"],
            key_id=data["key_id"],
            org=data.get("org") or None,
            model=data["model"],
            status=int(data["status"]),
            stream=data["stream"] == "1",
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            usage_source=data["usage_source"],
            started_at=float(data["started_at"]),
            duration_ms=int(data["duration_ms"]),
            record_id=data.get("record_id") or "",
            cached_tokens=int(data.get("cached_tokens") or 0),
            cost_micros=int(data.get("cost_micros") or 0),
            currency=data.get("currency") or "",
            price_id=data.get("price_id") or "",
        )

    def to_json(self) -> bytes:
        """The spool's payload (one line: orjson never writes a raw newline)."""
        return orjson.dumps({
            "request_id": self.request_id, "key_id": self.key_id, "org": self.org, "model": self.model,
            "status": self.status, "stream": self.stream, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "usage_source": self.usage_source,
            "started_at": self.started_at, "duration_ms": self.duration_ms, "record_id": self.record_id,
            "cached_tokens": self.cached_tokens, "cost_micros": self.cost_micros, "currency": self.currency,
            "price_id": self.price_id,
        })  # fmt: skip

    @classmethod
    def from_json(cls, payload: bytes) -> UsageRecord:
        data = orjson.loads(payload)
        # A spool written before a field existed lacks it: the field's default then.
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def periods(self) -> tuple[str, str]:
        """The record's hour and day (UTC), as used in aggregate key names."""
        return _periods(int(self.started_at // 3600))

    def aggregate_keys(self) -> list[str]:
        periods = self.periods()
        keys = [names.usage_aggregate("key", self.key_id, p) for p in periods]
        if self.org:
            keys += [names.usage_aggregate("org", self.org, p) for p in periods]
        return keys

    def script_call(self, writer_id: str, marker_ttl: int, stream_maxlen: int) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of `record_usage.lua` for this record."""
        members = [f"key:{self.key_id}"] + ([f"org:{self.org}"] if self.org else [])
        keys = [
            names.usage_marker(self.record_id), names.USAGE_STREAM, day_index(self.periods()[1][2:]),
            *self.aggregate_keys(),
        ]  # fmt: skip
        failed = 1 if self.status >= 400 else 0
        args: list[Any] = [
            marker_ttl, stream_maxlen, self.prompt_tokens, self.completion_tokens, failed, writer_id,
            len(members), *members, *self.fields(),
        ]  # fmt: skip
        return keys, args


@dataclass(slots=True)
class Settlement:
    """What to do in the store once a request has ended: [finish done, record handled]."""

    finish_keys: list[str]
    finish_args: list[int | str]
    record: UsageRecord | None = None
    done: list[bool] = field(default_factory=lambda: [False, False])
