"""Key and org changes, published to every replica so that their caches drop stale entries at once.

`Events` is what the services (`KeyService`, `OrgService`) call after each write: it tells this
process's own listeners at once (the auth cache, the org-limits cache), then publishes a small
JSON message on the Redis channel `liutong:events`. `Subscriber` runs in every gateway process
with its own connection, hands each message to the same listeners, and reconnects with backoff
when the store goes away. A message missed while disconnected is covered by the caches' TTL
(`key_cache_ttl`): every cached entry is re-validated against the store that often anyway.
Messages carry a key's digest (never the key) or an org's name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError

from gateway.store.names import PREFIX
from gateway.store.topology import pubsub_client

log = structlog.get_logger("liutong.events")

CHANNEL = f"{PREFIX}events"
# With no message for this long the subscriber pings; with no answer for 3x as long it reconnects.
PING_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "key" (id = the key's SHA-256 digest) or "org" (id = the org's name)
    id: str

    def encode(self) -> bytes:
        return orjson.dumps({"kind": self.kind, "id": self.id})

    @classmethod
    def decode(cls, raw: bytes | str) -> Event | None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("kind") not in ("key", "org") or not isinstance(data.get("id"), str):
            return None
        return cls(data["kind"], data["id"])


Listener = Callable[[Event], None]


class Events:
    """Tells local listeners about a change, then every other replica through the channel."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def deliver(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event_listener_failed", kind=event.kind)

    async def key_changed(self, key_digest: str) -> None:
        await self._publish(Event("key", key_digest))

    async def org_changed(self, org: str) -> None:
        await self._publish(Event("org", org))

    async def _publish(self, event: Event) -> None:
        self.deliver(event)
        try:
            await self._redis.publish(CHANNEL, event.encode())
        except (RedisError, OSError) as exc:
            # The change itself is stored; other replicas pick it up within their cache TTL.
            log.warning("event_publish_failed", kind=event.kind, error=type(exc).__name__)


class Subscriber:
    """One task per gateway process: `liutong:events` → `Events.deliver`. Its connection is its
    own, without a read timeout: one server, any Cluster node (plain Pub/Sub reaches them all),
    or the Sentinel's current master (`redis_topology.pubsub_client`)."""

    def __init__(self, redis_url: str, events: Events, *, connect_timeout: float = 2.0) -> None:
        self._url = redis_url
        self._events = events
        self._connect_timeout = connect_timeout
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self, wait: float = 1.0) -> None:
        """Start listening; wait up to `wait` seconds for the subscription to be confirmed."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="events-subscriber")
        try:
            await asyncio.wait_for(self.subscribed.wait(), wait)
        except TimeoutError:
            log.warning("events_not_subscribed_yet", message="Cache entries are re-validated on their TTL meanwhile.")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            client = pubsub_client(self._url, connect_timeout=self._connect_timeout)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                await self._listen(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                if self.subscribed.is_set():
                    log.warning("events_subscriber_disconnected", error=type(exc).__name__)
                    backoff = 0.1
                self.subscribed.clear()
            finally:
                await asyncio.shield(self._close(client, pubsub))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _listen(self, pubsub: Any) -> None:
        last_seen = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=PING_INTERVAL)
            now = time.monotonic()
            if message is None:
                if now - last_seen > 3 * PING_INTERVAL:
                    raise ConnectionError("no answer from the store on the events connection")
                await pubsub.ping()
                continue
            last_seen = now
            kind = message.get("type")
            if kind == "subscribe":
                if not self.subscribed.is_set():
                    log.info("events_subscribed", channel=CHANNEL)
                self.subscribed.set()
            elif kind == "message":
                event = Event.decode(message["data"])
                if event is not None:
                    self._events.deliver(event)

    @staticmethod
    async def _close(client: Any, pubsub: Any) -> None:
        try:
            await pubsub.aclose()
            await client.aclose()
        except Exception:  # closing a broken connection may fail too; nothing to do about it
            pass
