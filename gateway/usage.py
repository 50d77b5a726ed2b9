"""Usage records and the writer that settles finished requests in the store (CONTRACT §8).

A handler ends every admitted request with `UsageWriter.submit(settlement)`: a synchronous
call, so that a cancelled handler (client gone) can still make it in its `finally`. One
background task drains the queue and sends each batch as one pipeline of EVALSHAs:
`finish.lua` (tpm reconciliation + lease release, idempotent) and `record_usage.lua` (the usage
record, written once per `request_id`, with its hourly and daily aggregates). A batch that
fails stays queued and is retried with backoff; both scripts are idempotent, so a retry after
a lost reply neither double-refunds nor duplicates a record. `close()` flushes what is left.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import NoScriptError, RedisError

from gateway import store as names
from gateway.store import Store

log = structlog.get_logger("liutong.usage")

MARKER_TTL_SECONDS = 7 * 24 * 3600
STREAM_MAXLEN = 10_000_000
BATCH = 256


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
        ]  # fmt: skip

    def aggregate_keys(self) -> list[str]:
        stamp = time.gmtime(self.started_at)
        periods = (time.strftime("h:%Y%m%d%H", stamp), time.strftime("d:%Y%m%d", stamp))
        keys = [names.usage_aggregate("key", self.key_id, p) for p in periods]
        if self.org:
            keys += [names.usage_aggregate("org", self.org, p) for p in periods]
        return keys


@dataclass(slots=True)
class Settlement:
    """What to do in the store once a request has ended."""

    finish_keys: list[str]
    finish_args: list[int | str]
    record: UsageRecord | None = None
    done: list[bool] = field(default_factory=lambda: [False, False])


class UsageWriter:
    def __init__(self, store: Store, *, on_written: Callable[[UsageRecord], None] | None = None) -> None:
        self._store = store
        self._pending: deque[Settlement] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._on_written = on_written

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, settlement: Settlement) -> None:
        self._pending.append(settlement)
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-writer")

    async def close(self, timeout: float = 5.0) -> None:
        """Flush everything pending (for up to `timeout` seconds), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                log.error("usage_flush_incomplete", pending=len(self._pending))

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            try:
                await self._write(batch)
                backoff = 0.05
            except (RedisError, OSError) as exc:
                self._pending.extendleft(reversed(batch))
                log.warning("usage_write_failed", error=type(exc).__name__, pending=len(self._pending))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _write(self, batch: list[Settlement]) -> None:
        scripts = self._store.scripts
        calls: list[tuple[Settlement, int]] = []
        pipe = self._store.redis.pipeline(transaction=False)
        for item in batch:
            if not item.done[0]:
                pipe.evalsha(scripts.finish.sha, len(item.finish_keys), *item.finish_keys, *item.finish_args)
                calls.append((item, 0))
            if item.record is not None and not item.done[1]:
                record = item.record
                keys = [names.usage_marker(record.request_id), names.USAGE_STREAM, *record.aggregate_keys()]
                failed = 1 if record.status >= 400 else 0
                args: list[Any] = [
                    MARKER_TTL_SECONDS, STREAM_MAXLEN, record.prompt_tokens, record.completion_tokens, failed,
                    *record.fields(),
                ]  # fmt: skip
                pipe.evalsha(scripts.record_usage.sha, len(keys), *keys, *args)
                calls.append((item, 1))
        results = await pipe.execute(raise_on_error=False)
        missing_scripts = False
        for (item, step), result in zip(calls, results, strict=True):
            if isinstance(result, NoScriptError):
                missing_scripts = True
            elif isinstance(result, Exception):
                raise result
            else:
                item.done[step] = True
                if step == 1 and result == 1 and self._on_written and item.record is not None:
                    self._on_written(item.record)
        if missing_scripts:  # the server restarted or failed over: load the scripts, retry the rest
            await self._store.load_scripts()
            raise NoScriptError("scripts reloaded")
