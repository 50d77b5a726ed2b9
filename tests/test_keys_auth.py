"""Keys and the authenticator (CONTRACT §4, §1 auth): the key format, and the key cache in front of
a real Redis, driven by a fake clock.

The `Authenticator` reads key records through a `KeyService` over a real `redis-server`; a thin
wrapper counts the reads and can switch the service to a dead store (a closed port) to play an
outage, so that the cache, its TTL, negative caching and the stale-while-down rule are observed
from the outside: which keys are accepted, which get 401, which get 503, and how often the store
is asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import string
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from gateway.errors import InvalidApiKey, StoreUnavailable
from gateway.keys.auth import Authenticator
from gateway.keys.records import KeyRecord, KeyService, digest, generate_key
from gateway.store.names import key_record
from tests.conftest import free_port

KEY_RE = re.compile(r"lt_[A-Za-z0-9]{32,}")
TTL = 2.0
STALE_TTL = 60.0


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Keys:
    """A KeyService as the authenticator sees it, counting store reads; `outage()` points it at a
    closed port (the real redis-py error path), `restore()` back at the live store."""

    def __init__(self, live: KeyService, dead: KeyService) -> None:
        self.live = live
        self.dead = dead
        self.current = live
        self.reads = 0

    async def by_digest(self, digest_hex: str) -> KeyRecord | None:
        self.reads += 1
        return await self.current.by_digest(digest_hex)

    def outage(self) -> None:
        self.current = self.dead

    def restore(self) -> None:
        self.current = self.live


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    yield client
    await client.aclose()


@pytest.fixture
async def dead_store() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.1, socket_connect_timeout=0.1
    )
    yield client
    await client.aclose()


@pytest.fixture
def service(store: aioredis.Redis) -> KeyService:
    return KeyService(store)


@pytest.fixture
def keys(service: KeyService, dead_store: aioredis.Redis) -> Keys:
    return Keys(service, KeyService(dead_store))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def authenticator(keys: Keys, clock: FakeClock) -> Authenticator:
    return Authenticator(keys, clock, ttl=TTL, stale_ttl=STALE_TTL)  # type: ignore[arg-type]


def bearer(key: str) -> str:
    return f"Bearer {key}"


# --- key generation -------------------------------------------------------------------------


def test_generate_key_format_and_uniqueness() -> None:
    generated = [generate_key() for _ in range(1000)]
    assert len(set(generated)) == 1000, "generate_key repeated a key"
    for key in generated:
        assert KEY_RE.fullmatch(key), key
    bodies = "".join(k[3:] for k in generated)
    alphabet = set(string.ascii_letters + string.digits)
    assert set(bodies) <= alphabet
    # 1,000 keys of ≥ 32 characters draw on the whole alphabet (a hex or lower-case-only body
    # would be a much smaller key space than the contract's [A-Za-z0-9]).
    assert set(bodies) == alphabet


def test_digest_is_sha256_hex() -> None:
    key = generate_key()
    assert digest(key) == hashlib.sha256(key.encode()).hexdigest()


async def test_created_record_holds_digest_not_key(service: KeyService, store: aioredis.Redis) -> None:
    plaintext, record = await service.create("digest-only", org="acme", models=("indigo-owl-4",), rpm=7)
    assert KEY_RE.fullmatch(plaintext)
    assert record.digest == hashlib.sha256(plaintext.encode()).hexdigest()
    stored = await service.get(record.key_id)
    assert stored == record
    assert "digest" not in record.public() and plaintext not in str(record.public())
    dump = b""
    async for name in store.scan_iter("*"):
        assert name.startswith(b"liutong:"), name
        dump += name
        kind = await store.type(name)
        if kind == b"hash":
            for k, v in (await store.hgetall(name)).items():
                dump += k + v
        elif kind == b"string":
            dump += await store.get(name) or b""
        elif kind == b"set":
            dump += b"".join(await store.smembers(name))
    assert plaintext.encode() not in dump
    assert record.digest.encode() in dump


# --- the authenticator ----------------------------------------------------------------------


async def test_valid_key_is_cached_for_ttl_then_reread(
    authenticator: Authenticator, service: KeyService, keys: Keys, clock: FakeClock
) -> None:
    plaintext, record = await service.create("cached")
    assert (await authenticator.authenticate(bearer(plaintext))).key_id == record.key_id
    assert keys.reads == 1
    for _ in range(20):
        clock.advance(TTL / 25)
        assert (await authenticator.authenticate(bearer(plaintext))).key_id == record.key_id
    assert keys.reads == 1, "a key validated within the TTL was read from the store again"
    clock.advance(TTL)
    await authenticator.authenticate(bearer(plaintext))
    assert keys.reads == 2, "the cached record was not re-read after the TTL"


async def test_limit_change_is_seen_after_ttl(
    authenticator: Authenticator, service: KeyService, clock: FakeClock
) -> None:
    plaintext, record = await service.create("limits", rpm=5)
    assert (await authenticator.authenticate(bearer(plaintext))).rpm == 5
    await service.update(record.key_id, rpm=9)
    clock.advance(TTL + 0.01)
    assert (await authenticator.authenticate(bearer(plaintext))).rpm == 9


async def test_revoked_key_refused_once_ttl_passes(
    authenticator: Authenticator, service: KeyService, clock: FakeClock
) -> None:
    plaintext, record = await service.create("to-revoke")
    await authenticator.authenticate(bearer(plaintext))
    await service.revoke(record.key_id)
    clock.advance(TTL + 0.01)
    with pytest.raises(InvalidApiKey) as caught:
        await authenticator.authenticate(bearer(plaintext))
    assert caught.value.status == 401
    assert caught.value.code == "invalid_api_key"
    assert "revoked" in caught.value.message


async def test_disabled_key_refused_and_reenabled(
    authenticator: Authenticator, service: KeyService, clock: FakeClock
) -> None:
    plaintext, record = await service.create("toggle")
    await authenticator.authenticate(bearer(plaintext))
    await service.update(record.key_id, disabled=True)
    clock.advance(TTL + 0.01)
    with pytest.raises(InvalidApiKey, match="disabled"):
        await authenticator.authenticate(bearer(plaintext))
    await service.update(record.key_id, disabled=False)
    clock.advance(TTL + 0.01)
    assert (await authenticator.authenticate(bearer(plaintext))).key_id == record.key_id


async def test_unknown_key_is_cached_negatively(
    authenticator: Authenticator, keys: Keys, clock: FakeClock
) -> None:
    unknown = generate_key()
    for _ in range(10):
        with pytest.raises(InvalidApiKey) as caught:
            await authenticator.authenticate(bearer(unknown))
        assert caught.value.status == 401
        clock.advance(TTL / 20)
    assert keys.reads == 1, "each attempt with an unknown key cost a store read"
    clock.advance(TTL)
    with pytest.raises(InvalidApiKey):
        await authenticator.authenticate(bearer(unknown))
    assert keys.reads == 2


async def test_expired_key_is_refused(authenticator: Authenticator, service: KeyService) -> None:
    plaintext, _ = await service.create("old", expires_in=10, now=time.time() - 100)
    with pytest.raises(InvalidApiKey) as caught:
        await authenticator.authenticate(bearer(plaintext))
    assert caught.value.status == 401
    assert caught.value.code == "invalid_api_key"
    assert "expired" in caught.value.message


async def test_key_not_yet_expired_is_accepted(authenticator: Authenticator, service: KeyService) -> None:
    plaintext, record = await service.create("fresh", expires_in=3600)
    assert (await authenticator.authenticate(bearer(plaintext))).key_id == record.key_id


@pytest.mark.parametrize(
    "header",
    [None, "", "lt_" + "a" * 40, "Basic " + "lt_" + "a" * 40, "Bearer sk-" + "a" * 40, "Bearer lt_short",
     "Bearer lt_" + "a" * 39 + "!"],
)  # fmt: skip
async def test_missing_or_malformed_header_is_401_without_store_read(
    authenticator: Authenticator, keys: Keys, header: str | None
) -> None:
    with pytest.raises(InvalidApiKey) as caught:
        await authenticator.authenticate(header)
    assert caught.value.status == 401
    assert keys.reads == 0


async def test_record_with_other_digest_is_refused(
    authenticator: Authenticator, store: aioredis.Redis
) -> None:
    """A record found under a key's digest but holding another digest is not that key's record."""
    presented = generate_key()
    other = generate_key()
    forged = KeyRecord(key_id="key_forged", digest=digest(other), name="forged", created_at=time.time())
    await store.hset(key_record(digest(presented)), mapping=forged.to_hash())
    with pytest.raises(InvalidApiKey) as caught:
        await authenticator.authenticate(bearer(presented))
    assert caught.value.status == 401


async def test_update_racing_revoke_does_not_resurrect_key(
    authenticator: Authenticator, service: KeyService, store: aioredis.Redis, clock: FakeClock
) -> None:
    """`keys update` and `keys revoke` run at the same time (two operators, two processes): the
    update must not write back the record it read before the revocation, un-revoking the key."""

    class SlowRead:
        """The store as `keys update` sees it: its record read is answered, then held back."""

        def __init__(self) -> None:
            self.read_done = asyncio.Event()
            self.release = asyncio.Event()

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def hgetall(self, name: Any) -> Any:
            result = await store.hgetall(name)
            self.read_done.set()
            await self.release.wait()
            return result

    plaintext, record = await service.create("raced", rpm=5)
    slow = SlowRead()
    update = asyncio.create_task(KeyService(slow).update(record.key_id, rpm=9))
    await asyncio.wait_for(slow.read_done.wait(), 5)
    await service.revoke(record.key_id)
    slow.release.set()
    await asyncio.wait_for(update, 5)
    final = await service.get(record.key_id)
    assert final.revoked_at is not None, "a concurrent `keys update` un-revoked the key"
    with pytest.raises(InvalidApiKey, match="revoked"):
        await authenticator.authenticate(bearer(plaintext))


# --- store outage ---------------------------------------------------------------------------


async def test_outage_keeps_recently_validated_key(
    authenticator: Authenticator, service: KeyService, keys: Keys, clock: FakeClock
) -> None:
    plaintext, record = await service.create("survivor")
    await authenticator.authenticate(bearer(plaintext))
    keys.outage()
    clock.advance(TTL + 1)  # the entry is stale: the authenticator asks the (dead) store
    assert (await authenticator.authenticate(bearer(plaintext))).key_id == record.key_id
    assert keys.reads >= 2, "the store was not asked again after the TTL"
    clock.advance(STALE_TTL / 2)
    assert (await authenticator.authenticate(bearer(plaintext))).key_id == record.key_id
    keys.restore()
    clock.advance(TTL + 1)
    assert (await authenticator.authenticate(bearer(plaintext))).key_id == record.key_id


async def test_outage_unseen_key_gets_503_not_401(
    authenticator: Authenticator, service: KeyService, keys: Keys
) -> None:
    plaintext, _ = await service.create("never-seen")  # valid in the store, but not in the cache
    keys.outage()
    with pytest.raises(StoreUnavailable) as caught:
        await authenticator.authenticate(bearer(plaintext))
    assert not isinstance(caught.value, InvalidApiKey)
    assert caught.value.status == 503
    assert caught.value.code == "store_unavailable"
    # Also an unknown key: the gateway cannot tell, so it must not answer 401 either.
    with pytest.raises(StoreUnavailable):
        await authenticator.authenticate(bearer(generate_key()))
    # The store comes back: the key works.
    keys.restore()
    await authenticator.authenticate(bearer(plaintext))


async def test_outage_beyond_stale_ttl_gets_503(
    authenticator: Authenticator, service: KeyService, keys: Keys, clock: FakeClock
) -> None:
    plaintext, _ = await service.create("too-old")
    await authenticator.authenticate(bearer(plaintext))
    keys.outage()
    clock.advance(STALE_TTL + 1)
    with pytest.raises(StoreUnavailable):
        await authenticator.authenticate(bearer(plaintext))


async def test_outage_when_store_raises_connection_error(
    service: KeyService, clock: FakeClock
) -> None:
    """The same rule when the client raises redis' ConnectionError itself (a dropped connection)."""

    class Flaky:
        down = False

        async def by_digest(self, digest_hex: str) -> Any:
            if self.down:
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            return await service.by_digest(digest_hex)

    flaky = Flaky()
    authenticator = Authenticator(flaky, clock, ttl=TTL, stale_ttl=STALE_TTL)  # type: ignore[arg-type]
    seen, record = await service.create("seen")
    unseen, _ = await service.create("unseen")
    await authenticator.authenticate(bearer(seen))
    flaky.down = True
    clock.advance(TTL + 1)
    assert (await authenticator.authenticate(bearer(seen))).key_id == record.key_id
    with pytest.raises(StoreUnavailable):
        await authenticator.authenticate(bearer(unseen))


async def test_outage_timeout_is_503(service: KeyService, clock: FakeClock) -> None:
    """A store that stops answering (a timeout, not a refusal) is an outage too, not a 401."""

    class Hung:
        async def by_digest(self, digest_hex: str) -> Any:
            raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")

    authenticator = Authenticator(Hung(), clock, ttl=TTL, stale_ttl=STALE_TTL)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        await authenticator.authenticate(bearer(generate_key()))
