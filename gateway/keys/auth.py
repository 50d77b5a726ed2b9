"""Authenticate `Authorization: Bearer lt_…` against key records, through a short-TTL cache.

In the steady state a request costs no store round trip here: a record fetched less than
`ttl` seconds ago is reused, so a revocation takes effect within `ttl`. When the store is
unreachable, a key validated within `stale_ttl` is still served (a store outage never turns a
valid key into a 401); any other key gets 503 `store_unavailable`. Unknown keys are cached
too (briefly), so that a flood of bad keys does not become a flood of store reads.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway.errors import InvalidApiKey, StoreUnavailable
from gateway.keys.records import KEY_PATTERN, KeyRecord, KeyService, digest

_MAX_ENTRIES = 100_000


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None
    fetched_at: float
    retry_at: float = 0.0  # during an outage: when to try the store again for this key


class Authenticator:
    def __init__(self, keys: KeyService, clock: Callable[[], float], *, ttl: float, stale_ttl: float) -> None:
        self._keys = keys
        self._clock = clock
        self._ttl = ttl
        self._stale_ttl = stale_ttl
        self._cache: dict[str, _Entry] = {}
        self._reads: dict[str, asyncio.Future[_Entry]] = {}

    async def authenticate(self, header: str | None) -> KeyRecord:
        if not header:
            raise InvalidApiKey("Missing API key: send it as `Authorization: Bearer lt_…`.")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not KEY_PATTERN.fullmatch(token):
            raise InvalidApiKey("Malformed API key: expected `Authorization: Bearer lt_…`.")
        key_digest = digest(token)
        now = self._clock()
        entry = self._cache.get(key_digest)
        if entry is None or (now - entry.fetched_at >= self._ttl and now >= entry.retry_at):
            # Concurrent requests for one key share a single store read.
            pending = self._reads.get(key_digest)
            if pending is None:
                pending = asyncio.ensure_future(self._refresh(key_digest, entry, now))
                self._reads[key_digest] = pending
                pending.add_done_callback(lambda _: self._reads.pop(key_digest, None))
            entry = await asyncio.shield(pending)
        record = entry.record
        # The store looked the key up by digest; compare again in constant time all the same.
        if record is None or not hmac.compare_digest(record.digest, key_digest):
            raise InvalidApiKey("Incorrect API key provided.")
        problem = record.problem(time.time())
        if problem:
            raise InvalidApiKey(f"This API key is {problem}.")
        return record

    async def _refresh(self, key_digest: str, entry: _Entry | None, now: float) -> _Entry:
        try:
            record = await self._keys.by_digest(key_digest)
        except (RedisError, OSError):
            if entry is not None and entry.record is not None and now - entry.fetched_at < self._stale_ttl:
                entry.retry_at = now + 1.0  # don't make every request wait out a dead store
                return entry
            raise StoreUnavailable("The key store is unreachable; try again shortly.") from None
        fresh = _Entry(record, now)
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key_digest] = fresh
        return fresh

    def forget(self, key_digest: str) -> None:
        self._cache.pop(key_digest, None)
