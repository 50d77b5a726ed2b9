"""Structured JSON logs (structlog + orjson), written off the event loop.

Each log call renders one JSON line and hands it to a writer thread through a queue, so the
request path never blocks on stdout. Lines carry `timestamp`, `level`, `event` and the call's
fields. Keys never reach a log line: nothing logs a header or a body, only `key_id`.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections import deque
from typing import IO, Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _ThreadedLineWriter:
    """A structlog logger whose `msg` queues a line for a daemon thread to write.

    The queue is a deque (its append is thread-safe and wakes nobody); the thread looks at it
    every `INTERVAL` seconds and writes what is there in one syscall. Waking the thread per
    line cost the event loop a futex call per request.
    """

    INTERVAL = 0.02

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lines: deque[bytes] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def msg(self, message: bytes) -> None:
        self._lines.append(message)

    debug = info = warning = error = critical = exception = log = msg

    def _drain(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._write_waiting()
        self._write_waiting()

    def _write_waiting(self) -> None:
        lines = self._lines
        batch = []
        while lines:
            batch.append(lines.popleft())
        if batch:
            batch.append(b"")
            try:
                self._stream.write(b"\n".join(batch))
                self._stream.flush()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=2)


_writer: list[_ThreadedLineWriter] = []
_info_enabled = [True]
_second = [-1, ""]  # the last whole second seen, and its ISO-8601 text


def info_line(event: str, fields: dict[str, Any]) -> None:
    """One `info` line, as structlog would render it, without its processor chain: the access
    log's path (one line per request)."""
    if not _writer:  # logging not configured (a library user, a test): structlog's defaults
        structlog.get_logger("liutong").info(event, **fields)
        return
    if not _info_enabled[0]:
        return
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    fields["event"] = event
    fields["level"] = "info"
    fields["timestamp"] = f"{_second[1]}.{int((now - second) * 1e6):06d}Z"
    _writer[0].msg(orjson.dumps(fields))


def configure_logging(level: str = "info", stream: IO[bytes] | None = None) -> None:
    """Configure structlog once per process (later calls only change the level)."""
    if not _writer:
        _writer.append(_ThreadedLineWriter(stream or sys.stdout.buffer))
    writer = _writer[0]
    _info_enabled[0] = _LEVELS[level] <= logging.INFO

    def factory(*_args: Any) -> _ThreadedLineWriter:
        return writer

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the standard library: send them the same way, as JSON.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), format="%(message)s")


def flush_logs() -> None:
    for writer in _writer:
        writer.close()
