"""API keys: generation, digests, and the key records kept in the store.

A key is `lt_` + 40 characters of `[A-Za-z0-9]` drawn from `secrets` (a CSPRNG). The store
keeps only its SHA-256 digest and metadata under `liutong:key:<digest>`, plus an index from
the short public `key_id` to the digest. The plaintext is returned once by `create` and never
stored. The CLI and the admin API manage keys through `KeyService` only, and every change is
published through `Events` (see `keys/events.py`) so that every replica's cache drops the entry.
A rotated key's predecessor gets a `revoked_at` in the future: it works until then.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from gateway.keys.events import Events
from gateway.store import names

KEY_PREFIX = "lt_"
KEY_BODY_LENGTH = 40
KEY_PATTERN = re.compile(r"lt_[A-Za-z0-9]{32,200}")
_ALPHABET = string.ascii_letters + string.digits


def generate_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(KEY_BODY_LENGTH))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the store knows of a key. Limits are None when the config default applies."""

    key_id: str
    digest: str
    name: str
    org: str | None = None
    models: tuple[str, ...] = ()  # empty: every configured model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    expires_at: float | None = None
    disabled: bool = False
    revoked_at: float | None = None
    created_at: float = 0.0

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models

    def problem(self, now: float) -> str | None:
        """Why this key cannot be used now (for the 401 message), or None."""
        if self.revoked_at is not None and now >= self.revoked_at:
            return "revoked"
        if self.disabled:
            return "disabled"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return None

    def public(self) -> dict[str, Any]:
        """The record as shown to operators: everything but the digest."""
        data = asdict(self)
        del data["digest"]
        data["models"] = list(self.models)
        data["status"] = self.problem(time.time()) or "active"
        return data

    def to_hash(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "digest": self.digest,
            "name": self.name,
            "org": self.org or "",
            "models": ",".join(self.models),
            "rpm": "" if self.rpm is None else str(self.rpm),
            "tpm": "" if self.tpm is None else str(self.tpm),
            "max_concurrent": "" if self.max_concurrent is None else str(self.max_concurrent),
            "expires_at": "" if self.expires_at is None else repr(self.expires_at),
            "disabled": "1" if self.disabled else "0",
            "revoked_at": "" if self.revoked_at is None else repr(self.revoked_at),
            "created_at": repr(self.created_at),
        }

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> KeyRecord:
        h = {k.decode(): v.decode() for k, v in raw.items()}

        def opt_int(name: str) -> int | None:
            return int(h[name]) if h.get(name) else None

        def opt_float(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        return cls(
            key_id=h["key_id"],
            digest=h["digest"],
            name=h.get("name", ""),
            org=h.get("org") or None,
            models=tuple(m for m in h.get("models", "").split(",") if m),
            rpm=opt_int("rpm"),
            tpm=opt_int("tpm"),
            max_concurrent=opt_int("max_concurrent"),
            expires_at=opt_float("expires_at"),
            disabled=h.get("disabled") == "1",
            revoked_at=opt_float("revoked_at"),
            created_at=float(h.get("created_at") or 0.0),
        )


class KeyNotFound(LookupError):
    pass


class KeyRevoked(ValueError):
    """The key is revoked (or already rotated, its revocation scheduled): it cannot be rotated."""


class KeyService:
    """Create, read, update and revoke key records. One service for the CLI and the gateway."""

    def __init__(self, redis: Any, events: Events | None = None) -> None:
        self._redis = redis
        self._events = events or Events(redis)

    async def create(
        self,
        name: str,
        *,
        org: str | None = None,
        models: tuple[str, ...] = (),
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
        expires_in: float | None = None,
        now: float | None = None,
    ) -> tuple[str, KeyRecord]:
        """Returns the plaintext key (the only time it exists outside the caller) and its record."""
        now = time.time() if now is None else now
        plaintext = generate_key()
        record = KeyRecord(
            key_id=new_key_id(),
            digest=digest(plaintext),
            name=name,
            org=org,
            models=models,
            rpm=rpm,
            tpm=tpm,
            max_concurrent=max_concurrent,
            expires_at=None if expires_in is None else now + expires_in,
            created_at=now,
        )
        await self._save(record)
        return plaintext, record

    async def _save(self, record: KeyRecord) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(names.key_record(record.digest), mapping=record.to_hash())
        pipe.set(names.key_id_index(record.key_id), record.digest)
        pipe.sadd(names.KEY_IDS, record.key_id)
        await pipe.execute()

    async def by_digest(self, digest_hex: str) -> KeyRecord | None:
        raw = await self._redis.hgetall(names.key_record(digest_hex))
        return KeyRecord.from_hash(raw) if raw else None

    async def get(self, key_id: str) -> KeyRecord:
        found = await self._redis.get(names.key_id_index(key_id))
        record = await self.by_digest(found.decode()) if found else None
        if record is None:
            raise KeyNotFound(key_id)
        return record

    async def list(self, *, org: str | None = None, name: str | None = None) -> list[KeyRecord]:
        """Every key (oldest first), or those of one `org` and/or with exactly this `name`."""
        ids = sorted(k.decode() for k in await self._redis.smembers(names.KEY_IDS))
        pipe = self._redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.get(names.key_id_index(key_id))
        digests = await pipe.execute() if ids else []
        pipe = self._redis.pipeline(transaction=False)
        for found in digests:
            if found:
                pipe.hgetall(names.key_record(found.decode()))
        raws = await pipe.execute() if any(digests) else []
        records = [KeyRecord.from_hash(raw) for raw in raws if raw]
        if org is not None:
            records = [r for r in records if r.org == org]
        if name is not None:
            records = [r for r in records if r.name == name]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    async def update(self, key_id: str, **changes: Any) -> KeyRecord:
        """Change only the named fields, so that a concurrent revoke is never undone."""
        record = replace(await self.get(key_id), **changes)
        if not changes:
            return record
        fields = record.to_hash()
        await self._redis.hset(names.key_record(record.digest), mapping={k: fields[k] for k in changes})
        await self._events.key_changed(record.digest)
        return await self.get(key_id)

    async def revoke(self, key_id: str, *, now: float | None = None) -> KeyRecord:
        """Revoke now (also a key whose revocation a rotation scheduled for later)."""
        now = time.time() if now is None else now
        record = await self.get(key_id)
        if record.revoked_at is None or record.revoked_at > now:
            return await self.update(key_id, revoked_at=now)
        return record

    async def rotate(
        self, key_id: str, *, overlap: float, now: float | None = None
    ) -> tuple[str, KeyRecord, KeyRecord]:
        """A new key (new `key_id`, same name, org, models, limits, expiry) replaces `key_id`,
        which keeps working for `overlap` seconds and is revoked then. Returns the new plaintext,
        the new record and the old one."""
        now = time.time() if now is None else now
        old = await self.get(key_id)
        if old.revoked_at is not None:
            raise KeyRevoked(key_id)
        plaintext = generate_key()
        new = replace(old, key_id=new_key_id(), digest=digest(plaintext), revoked_at=None, created_at=now)
        # Claim the rotation first, so that two concurrent rotations cannot both succeed.
        if not await self._redis.hsetnx(names.key_record(old.digest), "rotated_to", new.key_id):
            raise KeyRevoked(key_id)
        await self._save(new)
        old = await self.update(key_id, revoked_at=now + overlap)
        return plaintext, new, old
