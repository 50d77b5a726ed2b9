"""The writer that settles finished requests in the store (CONTRACT §8).

A handler ends every admitted request with `UsageWriter.submit(settlement)`: a synchronous
call, so that a cancelled handler (client gone) can still make it in its `finally`. One
background task drains the queue and sends each batch as one pipeline of EVALSHAs:
`finish.lua` (tpm reconciliation + lease release, idempotent) and `record_usage.lua` (the usage
record, written once per record id, with its hourly and daily aggregates in the same step).

When the store does not answer, the records of the batch (and every later one until the store
answers again) go to the spool (`usage/spool.py`), a local append-only file; the task replays it in
order as soon as the store answers, and replays at start-up what an earlier process left.
Lease releases that fail are retried from memory (a lease also expires on its own). `close()`
writes what it can for a few seconds and spools the rest, so SIGTERM loses no record.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError

from gateway.store.client import ScriptCall, Store
from gateway.usage.records import Settlement, UsageRecord
from gateway.usage.spool import MemorySpool, Spool

log = structlog.get_logger("liutong.usage")

MARKER_TTL_SECONDS = 7 * 24 * 3600  # a spooled record replayed later than this could duplicate
STREAM_MAXLEN = 10_000_000
BATCH = 256
REPLAY_BATCH = 512
WRITE_TIMEOUT = 2.0  # one pipeline to the store, before the batch counts as failed
MIN_BACKOFF, MAX_BACKOFF = 0.05, 1.0  # between attempts while the store fails
MAX_FINISH_BACKLOG = 10_000  # lease releases kept for retry (older ones expire on their own)
CLOSE_ATTEMPTS = 2  # failed attempts after `close()` before the store counts as down
_STORE_ERRORS = (RedisError, OSError, TimeoutError)
T = TypeVar("T")


class UsageWriter:
    def __init__(
        self,
        store: Store,
        *,
        spool: Spool | None = None,
        stream_maxlen: int = STREAM_MAXLEN,
        marker_ttl: int = MARKER_TTL_SECONDS,
        on_written: Callable[[UsageRecord], None] | None = None,
        on_pending: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._spool: Spool = spool if spool is not None else MemorySpool()
        self._stream_maxlen = stream_maxlen
        self._marker_ttl = marker_ttl
        self._on_written = on_written
        self._on_pending = on_pending
        self._clock = clock
        self._writer_id = os.urandom(8).hex()
        self._pending: deque[Settlement] = deque()
        self._batch: list[Settlement] = []  # taken from `_pending`, being written or spooled
        self._finishes: deque[Settlement] = deque()  # lease releases waiting for the store
        self._replay: tuple[list[Settlement], int, int] | None = None  # a spool page being replayed
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._retry_at = 0.0  # while the store fails: when to try it again
        self._backoff = MIN_BACKOFF
        self._failing = False
        self._recovering = True  # until the spool left by an earlier process has been read
        self._closed = False
        self._failures_closing = 0

    @property
    def pending(self) -> int:
        """Settlements not yet done in the store, spooled records included (and 1 until the
        spool an earlier process may have left has been looked at)."""
        return len(self._pending) + len(self._batch) + len(self._finishes) + self._spool.records + self._recovering

    @property
    def spooled(self) -> int:
        return self._spool.records

    def submit(self, settlement: Settlement) -> None:
        if self._closed:
            record = settlement.record
            log.error("usage_submitted_after_close", request_id=record.request_id if record else None)
        self._pending.append(settlement)
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-writer")

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is pending for up to `timeout` seconds (spool it at once if the store is
        down), spool whatever is left, and release the spool."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
                log.warning("usage_flush_incomplete", pending=self.pending)
            except Exception:
                log.exception("usage_writer_failed")
        left = [s for s in (*self._batch, *self._pending) if s.record is not None and not s.done[1]]
        if self._replay is not None:
            self._replay = None  # its records are still in the spool file
        try:
            if left:
                await self._io(self._spool.append, [s.record.to_json() for s in left])  # type: ignore[union-attr]
                for s in left:
                    s.done[1] = True
                log.warning("usage_spooled_at_exit", records=len(left))
            await self._io(self._spool.close)
        except OSError as exc:
            log.error("usage_records_lost", records=len(left), error=str(exc))
        unsettled = sum(1 for s in (*self._batch, *self._pending, *self._finishes) if not s.done[0])
        if unsettled:
            log.warning("usage_leases_unreleased", count=unsettled,
                        message="concurrency leases expire on their own after concurrency_lease_seconds")  # fmt: skip
        self._pending.clear()
        self._finishes.clear()
        self._batch = []
        self._recovering = False
        self._closed = True
        self._report()

    # --- the background task -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._io(self._spool.recover)
        except OSError as exc:
            log.error("usage_spool_unreadable", error=str(exc))
        self._recovering = False
        while True:
            self._report()
            if self._closing and self._done_closing():
                return
            busy = False
            try:
                if self._pending:
                    busy = True
                    await self._take_batch()
                if (self._spool.records or self._finishes) and self._clock() >= self._retry_at:
                    busy = True
                    await self._retry()
                due = self._spool.sync_due(self._clock())
                if due == 0:
                    await self._io(self._spool.sync)
            except Exception:  # a bug or a disk error: never lose the loop (records stay queued)
                log.exception("usage_writer_error")
                await asyncio.sleep(MAX_BACKOFF)
            if not busy:
                await self._idle()

    def _done_closing(self) -> bool:
        if self._pending or self._batch:
            return False
        if not (self._spool.records or self._finishes):
            return True
        # The store failed again since `close()`: it is down, what waits stays spooled. (One
        # failure from before may be a stale connection to a restarted server: try once more.)
        return self._failures_closing >= CLOSE_ATTEMPTS

    async def _idle(self) -> None:
        """Sleep until a submit, the next retry of the store, or the next interval fsync."""
        self._wakeup.clear()
        if self._pending:
            return
        now = self._clock()
        waits = [w for w in (self._spool.sync_due(now),) if w is not None]
        if self._spool.records or self._finishes:
            waits.append(max(0.0, self._retry_at - now))
        try:
            async with asyncio.timeout(min(waits) if waits else None):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _take_batch(self) -> None:
        self._batch = batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
        try:
            if self._clock() >= self._retry_at:
                try:
                    await self._write(batch)
                    self._store_answered()
                    return
                except _STORE_ERRORS as exc:
                    self._store_failed(exc)
            await self._set_aside(batch)
        except asyncio.CancelledError:  # `close()` gave up waiting: it spools what is not done
            self._pending.extendleft(reversed(batch))
            raise
        finally:
            self._batch = []

    async def _set_aside(self, batch: list[Settlement]) -> None:
        """The store failed: records to the spool, lease releases to the retry queue."""
        waiting = [s for s in batch if s.record is not None and not s.done[1]]
        try:
            await self._io(self._spool.append, [s.record.to_json() for s in waiting])  # type: ignore[union-attr]
        except OSError as exc:  # a full or broken disk: keep them in memory, try again later
            log.error("usage_spool_write_failed", error=str(exc), records=len(waiting))
            self._pending.extendleft(reversed(batch))
            await asyncio.sleep(MAX_BACKOFF)
            return
        for s in waiting:
            s.done[1] = True
        for s in batch:
            if not s.done[0]:
                self._finishes.append(s)
        while len(self._finishes) > MAX_FINISH_BACKLOG:
            self._finishes.popleft()

    async def _retry(self) -> None:
        """Settle waiting lease releases, then replay one page of the spool."""
        try:
            if self._finishes:
                finishes = [self._finishes.popleft() for _ in range(min(BATCH, len(self._finishes)))]
                try:
                    await self._write(finishes)
                finally:
                    self._finishes.extendleft(reversed([s for s in finishes if not s.done[0]]))
            if self._spool.records:
                if self._replay is None:
                    payloads, end = await self._io(self._spool.read, REPLAY_BATCH)
                    page = []
                    for payload in payloads:
                        try:
                            page.append(Settlement([], [], UsageRecord.from_json(payload), [True, False]))
                        except (ValueError, TypeError, KeyError) as exc:
                            log.error("usage_spool_bad_record", error=str(exc),
                                      payload=payload[:200].decode("utf-8", "replace"))  # fmt: skip
                    self._replay = (page, end, len(payloads))
                page, end, count = self._replay
                await self._write(page)
                await self._io(self._spool.commit, end, count)
                self._replay = None
                if not self._spool.records:
                    log.info("usage_spool_replayed")
            self._store_answered()
        except _STORE_ERRORS as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: BaseException) -> None:
        if self._closing:
            self._failures_closing += 1
        if not self._failing:
            log.warning("usage_store_unreachable", error=type(exc).__name__, detail=str(exc)[:200],
                        message="usage records go to the local spool until the store answers")  # fmt: skip
        self._failing = True
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _store_answered(self) -> None:
        if self._failing:
            log.info("usage_store_back", spooled=self._spool.records)
        self._failing = False
        self._retry_at = 0.0
        self._backoff = MIN_BACKOFF

    async def _write(self, batch: Sequence[Settlement]) -> None:
        """One pipeline for the batch's unfinished steps; raises if any step failed."""
        scripts = self._store.scripts
        calls: list[ScriptCall] = []
        steps: list[tuple[Settlement, int]] = []
        for item in batch:
            if not item.done[0]:
                calls.append((scripts.finish, item.finish_keys, item.finish_args))
                steps.append((item, 0))
            if item.record is not None and not item.done[1]:
                keys, args = item.record.script_call(self._writer_id, self._marker_ttl, self._stream_maxlen)
                calls.append((scripts.record_usage, keys, args))
                steps.append((item, 1))
        if not calls:
            return
        async with asyncio.timeout(WRITE_TIMEOUT):
            results = await self._store.run_many(calls)
        error: BaseException | None = None
        for (item, step), result in zip(steps, results, strict=True):
            if isinstance(result, BaseException):
                error = error or result
            else:
                item.done[step] = True
                # 2: this writer wrote it before and lost the reply, so it was never counted.
                if step == 1 and result in (1, 2) and self._on_written is not None:
                    self._written(item.record)  # type: ignore[arg-type]
        if error is not None:
            raise error

    def _written(self, record: UsageRecord) -> None:
        try:
            self._on_written(record)  # type: ignore[misc]
        except Exception:
            log.exception("usage_on_written_failed")

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a spool call: in a thread when it touches the disk, so the loop never blocks."""
        if getattr(self._spool, "durable", False):
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _report(self) -> None:
        if self._on_pending is not None:
            self._on_pending(self.pending)
