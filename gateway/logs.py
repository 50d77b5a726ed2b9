"""Structured JSON logs (structlog + orjson), written off the event loop.

Each log call renders one JSON line and hands it to a writer thread through a queue, so the
request path never blocks on stdout. Lines carry `timestamp`, `level`, `event` and the call's
fields. Keys never reach a log line: nothing logs a header or a body, only `key_id`.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
from typing import IO, Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _ThreadedLineWriter:
    """A structlog logger whose `msg` queues a line for a daemon thread to write."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def msg(self, message: bytes) -> None:
        self._queue.put(message)

    debug = info = warning = error = critical = exception = log = msg

    def _drain(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            lines = [line]
            while True:  # write whatever else is waiting in the same syscall
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._write(lines)
                    return
                lines.append(nxt)
            self._write(lines)

    def _write(self, lines: list[bytes]) -> None:
        try:
            self._stream.write(b"\n".join(lines) + b"\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=2)


_writer: list[_ThreadedLineWriter] = []


def configure_logging(level: str = "info", stream: IO[bytes] | None = None) -> None:
    """Configure structlog once per process (later calls only change the level)."""
    if not _writer:
        _writer.append(_ThreadedLineWriter(stream or sys.stdout.buffer))
    writer = _writer[0]

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
