"""The local spool: usage records that wait on this host while the store is unreachable.

When Redis does not answer, the usage writer (`usage/writer.py`) appends the records it could not
write here, and replays them in order once Redis answers again; `record_usage.lua`'s
idempotence marker makes a replayed record that had reached the store after all a no-op.
After a complete replay the file is truncated. `FileSpool` is an append-only file with one
record per line, `<crc32 of the payload, 8 hex digits> <payload>\\n` (the payload is the
record as JSON): a line whose checksum does not match, such as a last line torn by a power
loss, is skipped with a warning, never a crash, and a torn tail is cut off when the file is
adopted. `MemorySpool` keeps records in memory only (the embedded store, or no spool path).

Several gateway processes may share one directory: each holds an exclusive `flock` on its own
file (`path`, else `path.1`, `path.2`, …). A process adopts, at start-up, every spool file that
no live process holds (what a stopped or crashed predecessor left), and the file it takes when
it first needs one may be such a leftover too; either way those records are replayed.

Durability of an append (`fsync`): `always` fsyncs before the records count as spooled (a
power loss loses nothing; one disk flush per batch); `interval` (the default) fsyncs at most
every `fsync_interval` seconds (a crash of the process loses nothing, the data being in the
kernel's page cache; a power loss loses at most the last interval); `never` leaves flushing to
the operating system. The file is always fsynced when the gateway stops.

Every `FileSpool` method blocks on the disk: the writer calls them through `asyncio.to_thread`.
A lock serialises them, so that a call still running in a thread after its caller gave up
cannot interleave with the next one.
"""

from __future__ import annotations

import os
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import structlog

try:
    import fcntl
except ImportError:  # not POSIX: no locking, one gateway per spool path
    fcntl = None  # type: ignore[assignment]

log = structlog.get_logger("liutong.spool")

FSYNC_POLICIES = ("always", "interval", "never")
MAX_FILES = 64  # path, path.1 … path.63: gateway processes sharing one spool directory
_CHUNK = 1 << 20


class Spool(Protocol):
    """What the usage writer needs of a spool (records are opaque byte payloads here)."""

    durable: bool

    @property
    def records(self) -> int: ...

    def recover(self) -> int: ...

    def append(self, payloads: Sequence[bytes]) -> None: ...

    def read(self, limit: int) -> tuple[list[bytes], int]: ...

    def commit(self, end: int, count: int) -> None: ...

    def sync_due(self, now: float) -> float | None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


def frame(payload: bytes) -> bytes:
    """One spool line: checksum, space, payload, newline (the payload holds no newline)."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def unframe(line: bytes) -> bytes | None:
    """The payload of a line without its newline, or None when the line is corrupt or torn."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        checksum = int(line[:8], 16)
    except ValueError:
        return None
    return payload if zlib.crc32(payload) == checksum else None


class MemorySpool:
    """Records wait in memory: nothing survives the process (no spool file configured)."""

    durable = False

    def __init__(self) -> None:
        self._items: deque[bytes] = deque()

    @property
    def records(self) -> int:
        return len(self._items)

    def recover(self) -> int:
        return 0

    def append(self, payloads: Sequence[bytes]) -> None:
        self._items.extend(payloads)

    def read(self, limit: int) -> tuple[list[bytes], int]:
        batch = [self._items[i] for i in range(min(limit, len(self._items)))]
        return batch, len(batch)

    def commit(self, end: int, count: int) -> None:
        for _ in range(end):
            self._items.popleft()

    def sync_due(self, now: float) -> float | None:
        return None

    def sync(self) -> None:
        pass

    def close(self) -> None:
        if self._items:
            log.error("usage_records_lost", records=len(self._items),
                      reason="no usage_spool_path: records that waited in memory are gone")  # fmt: skip


class FileSpool:
    """The append-only spool file of this process (see the module docstring)."""

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._own: Path | None = None  # the file this process holds
        self._records = 0  # valid records in the file not yet replayed
        self._size = 0  # bytes in the file
        self._offset = 0  # bytes of the file already replayed
        self._dirty_since: float | None = None  # first append not yet fsynced
        self.skipped = 0  # corrupt lines skipped since start

    @property
    def records(self) -> int:
        return self._records

    @property
    def file(self) -> Path | None:
        return self._own

    # --- files and locks ---------------------------------------------------------------------

    def _candidates(self) -> list[Path]:
        return [self.path] + [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, MAX_FILES)]

    def _existing(self) -> list[Path]:
        directory = self.path.parent
        pattern = re.compile(re.escape(self.path.name) + r"(?:\.(\d+))?")
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = pattern.fullmatch(name)
            if match:
                found.append((int(match.group(1) or 0), directory / name))
        return [p for _, p in sorted(found)]

    @staticmethod
    def _lock_file(path: Path, create: bool) -> int | None:
        """An fd of `path` under an exclusive lock, or None when another process holds it."""
        flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Its last holder may have removed it between our open and our lock.
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        return fd

    def _adopt(self, fd: int, path: Path) -> None:
        """Make `path` this process's spool: count its records, cut a torn last line."""
        records, end, size = _scan(fd)
        if end < size:
            log.warning("usage_spool_torn_tail", path=str(path), bytes=size - end,
                        message="the last spool line was incomplete (a crash or power loss while writing); "
                        "it was skipped")  # fmt: skip
            os.ftruncate(fd, end)
            os.fsync(fd)
        self._fd, self._own = fd, path
        self._records, self._size, self._offset = records, end, 0
        if records:
            log.warning("usage_spool_recovered", path=str(path), records=records,
                        message="records left by an earlier process will be written to the store")  # fmt: skip

    def _ensure_open(self) -> int:
        if self._fd is not None:
            return self._fd
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for candidate in self._candidates():
            fd = self._lock_file(candidate, create=True)
            if fd is not None:
                self._adopt(fd, candidate)
                _fsync_dir(candidate.parent)
                return fd
        raise OSError(f"all {MAX_FILES} spool files at {self.path} are held by other processes")

    # --- the writer's operations -------------------------------------------------------------

    def recover(self) -> int:
        """Adopt what earlier processes left (abandoned spool files); the records to replay."""
        with self._lock:
            for path in self._existing():
                if path == self._own:
                    continue
                fd = self._lock_file(path, create=False)
                if fd is None:
                    continue  # a live process holds it
                if self._fd is None:
                    self._adopt(fd, path)
                    continue
                try:  # a second leftover: move its valid lines into ours, then remove it
                    batch: list[bytes] = []
                    moved = 0
                    for line in _lines(fd, os.fstat(fd).st_size):
                        if unframe(line) is not None:
                            batch.append(line + b"\n")
                        if len(batch) >= 1024:
                            self._write(b"".join(batch), len(batch))
                            moved, batch = moved + len(batch), []
                    self._write(b"".join(batch), len(batch))
                    os.fsync(self._fd)
                    os.unlink(path)
                    if moved + len(batch):
                        log.warning("usage_spool_recovered", path=str(path), records=moved + len(batch),
                                    message="records left by an earlier process will be written to the store")  # fmt: skip
                finally:
                    os.close(fd)
            directory = self.path.parent
            if not os.access(directory if directory.exists() else directory.parent, os.W_OK):
                log.error("usage_spool_unwritable", path=str(self.path),
                          message="records could not be spooled in a store outage: check usage_spool_path")  # fmt: skip
            return self._records

    def append(self, payloads: Sequence[bytes]) -> None:
        if not payloads:
            return
        data = b"".join(frame(p) for p in payloads)
        with self._lock:
            self._ensure_open()
            self._write(data, len(payloads))
            if self.fsync == "always":
                os.fsync(self._fd)  # type: ignore[arg-type]
            elif self._dirty_since is None:
                self._dirty_since = self._clock()

    def _write(self, data: bytes, count: int) -> None:
        assert self._fd is not None  # type narrowing: callers run _ensure_open() first
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError:
            os.ftruncate(self._fd, self._size)  # never leave half a line for the next append to extend
            raise
        self._size += len(data)
        self._records += count

    def read(self, limit: int) -> tuple[list[bytes], int]:
        """Up to `limit` payloads from where the replay stands, and the offset after them."""
        with self._lock:
            if self._fd is None or self._offset >= self._size:
                return [], self._offset
            payloads: list[bytes] = []
            offset = pos = self._offset
            buffer = b""
            while len(payloads) < limit and pos < self._size:
                chunk = os.pread(self._fd, min(_CHUNK, self._size - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                buffer += chunk
                start = 0
                while len(payloads) < limit:
                    newline = buffer.find(b"\n", start)
                    if newline < 0:
                        break
                    line = buffer[start:newline]
                    start = newline + 1
                    payload = unframe(line)
                    if payload is None:
                        self.skipped += 1
                        log.warning("usage_spool_corrupt_line", path=str(self._own), offset=offset, bytes=len(line),
                                    message="a spool line failed its checksum and was skipped")  # fmt: skip
                    else:
                        payloads.append(payload)
                    offset += len(line) + 1
                buffer = buffer[start:]
            if not payloads and pos >= self._size:
                offset = self._size  # only corrupt lines or a fragment were left: nothing to replay
            return payloads, offset

    def commit(self, end: int, count: int) -> None:
        """The records up to `end` are in the store: move on, and truncate once all are."""
        with self._lock:
            if self._fd is None:
                return
            self._offset = max(self._offset, end)
            self._records = max(0, self._records - count)
            if self._offset >= self._size:
                os.ftruncate(self._fd, 0)
                if self.fsync != "never":
                    os.fsync(self._fd)
                self._size = self._offset = self._records = 0
                self._dirty_since = None

    def sync_due(self, now: float) -> float | None:
        """Seconds until the interval fsync is due (0: now), or None when nothing waits."""
        if self._dirty_since is None or self.fsync != "interval":
            return None
        return max(0.0, self._dirty_since + self.fsync_interval - now)

    def sync(self) -> None:
        with self._lock:
            if self._fd is not None and self._dirty_since is not None:
                os.fsync(self._fd)
            self._dirty_since = None

    def close(self) -> None:
        """fsync and release the file; remove it when it holds nothing to replay."""
        with self._lock:
            if self._fd is None:
                return
            fd, path = self._fd, self._own
            self._fd = self._own = None
            try:
                if self._records == 0 and path is not None:
                    os.ftruncate(fd, 0)
                    os.unlink(path)
                else:
                    os.fsync(fd)
                    log.warning("usage_spool_kept", path=str(path), records=self._records,
                                message="records stay in the spool until a gateway starts with this path")  # fmt: skip
            finally:
                os.close(fd)
                self._dirty_since = None


def _lines(fd: int, size: int) -> Iterator[bytes]:
    """The complete lines (without their newline) of the first `size` bytes, read in chunks."""
    pos = 0
    buffer = b""
    while pos < size:
        chunk = os.pread(fd, min(_CHUNK, size - pos), pos)
        if not chunk:
            return
        pos += len(chunk)
        buffer += chunk
        start = 0
        while (newline := buffer.find(b"\n", start)) >= 0:
            yield buffer[start:newline]
            start = newline + 1
        buffer = buffer[start:]


def _scan(fd: int) -> tuple[int, int, int]:
    """Valid records, the offset after the last complete line, and the size of the file."""
    size = os.fstat(fd).st_size
    records = end = 0
    for line in _lines(fd, size):
        records += unframe(line) is not None
        end += len(line) + 1
    return records, end, size


def _fsync_dir(directory: Path) -> None:
    """Make a new file's directory entry durable too (best effort: not every OS allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_spool(path: str | None, *, fsync: str = "interval", fsync_interval: float = 1.0) -> Spool:
    """The spool for `usage_spool_path`: a file, or memory only when no path is set."""
    if not path:
        return MemorySpool()
    return FileSpool(path, fsync=fsync, fsync_interval=fsync_interval)
