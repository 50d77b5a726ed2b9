"""Organisations and their org-wide limits, shared by all the org's keys (CONTRACT §3, §5).

An org record is the hash `liutong:org:<org>` with `rpm` and `tpm` (empty: no org-wide limit
for that dimension), `created_at` and `updated_at`; the set `liutong:orgs` lists them. The
limiter reads `rpm` and `tpm` from the same hash (`AppState._org_limits`), and every change is
published through `Events` so that each replica's org cache drops the entry at once. The CLI
(`orgs …`) and the admin API (`/admin/orgs`) go through `OrgService` only.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from gateway.keys.events import Events
from gateway.store import names

# An org name is part of Redis hash tags (`{o:<org>}`): no braces, no spaces, bounded length.
ORG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_org(name: str) -> bool:
    return bool(ORG_PATTERN.fullmatch(name))


@dataclass(frozen=True, slots=True)
class OrgRecord:
    org: str
    rpm: int | None = None  # None (or 0): no org-wide limit on requests per minute
    tpm: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def to_hash(self) -> dict[str, str]:
        return {
            "org": self.org,
            "rpm": "" if self.rpm is None else str(self.rpm),
            "tpm": "" if self.tpm is None else str(self.tpm),
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
        }

    @classmethod
    def from_hash(cls, org: str, raw: dict[bytes, bytes]) -> OrgRecord:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            org=org,
            rpm=int(h["rpm"]) if h.get("rpm") else None,
            tpm=int(h["tpm"]) if h.get("tpm") else None,
            created_at=float(h.get("created_at") or 0.0),
            updated_at=float(h.get("updated_at") or 0.0),
        )


class OrgNotFound(LookupError):
    pass


class OrgExists(ValueError):
    pass


class OrgService:
    def __init__(self, redis: Any, events: Events | None = None) -> None:
        self._redis = redis
        self._events = events or Events(redis)

    async def create(self, org: str, *, rpm: int | None = None, tpm: int | None = None,
                     now: float | None = None) -> OrgRecord:  # fmt: skip
        if not valid_org(org):
            raise ValueError(f"invalid org name {org!r}")
        now = time.time() if now is None else now
        record = OrgRecord(org, rpm, tpm, created_at=now, updated_at=now)
        # `created_at` is written first and only if absent: of two concurrent creates, one wins.
        if not await self._redis.hsetnx(names.org_record(org), "created_at", repr(now)):
            raise OrgExists(org)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(names.org_record(org), mapping=record.to_hash())
        pipe.sadd(names.ORGS, org)
        await pipe.execute()
        await self._events.org_changed(org)
        return record

    async def get(self, org: str) -> OrgRecord:
        raw = await self._redis.hgetall(names.org_record(org)) if valid_org(org) else None
        if not raw:
            raise OrgNotFound(org)
        return OrgRecord.from_hash(org, raw)

    async def list(self) -> list[OrgRecord]:
        orgs = sorted(o.decode() for o in await self._redis.smembers(names.ORGS))
        pipe = self._redis.pipeline(transaction=False)
        for org in orgs:
            pipe.hgetall(names.org_record(org))
        raws = await pipe.execute() if orgs else []
        return [OrgRecord.from_hash(org, raw) for org, raw in zip(orgs, raws, strict=True) if raw]

    async def update(self, org: str, *, now: float | None = None, **changes: int | None) -> OrgRecord:
        """Change only the named limits (`rpm`, `tpm`; None removes that org-wide limit)."""
        unknown = set(changes) - {"rpm", "tpm"}
        if unknown:
            raise TypeError(f"unknown org fields: {sorted(unknown)}")
        current = await self.get(org)
        record = replace(
            current,
            rpm=changes.get("rpm", current.rpm),
            tpm=changes.get("tpm", current.tpm),
            updated_at=time.time() if now is None else now,
        )
        fields = record.to_hash()
        await self._redis.hset(names.org_record(org), mapping={k: fields[k] for k in (*changes, "updated_at")})
        await self._events.org_changed(org)
        return record
