"""Processes the benchmark starts, and what `/proc` says about them.

`Service` starts one long-running process pinned to a set of cores (`taskset -c`), waits until
it answers, and stops it with SIGTERM (then SIGKILL) by its own pid only. `cpu_seconds`,
`rss_bytes` and `peak_rss_bytes` read `/proc/<pid>/stat` and `/proc/<pid>/status` of a process
and its descendants (a gateway with `--workers` forks), and `CoreLoad` measures how busy a core
was, so that a run can tell how much of its core the process under test did not have.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (children listed by each of their threads)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
    return found


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants, in seconds (clock-tick resolution)."""
    total = 0
    for p in descendants(pid):
        fields = _stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / CLK_TCK


def _status_kib(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    return sum(_status_kib(p, "VmRSS") for p in descendants(pid)) * 1024


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (the kernel's high-water mark) summed over the process tree."""
    return sum(_status_kib(p, "VmHWM") for p in descendants(pid)) * 1024


class CoreLoad:
    """Busy time of some cores between `start()` and `stop()`, from `/proc/stat`."""

    def __init__(self, cores: Sequence[int]) -> None:
        self.cores = tuple(cores)
        self._start: dict[int, tuple[int, int]] = {}
        self._t0 = 0.0

    @staticmethod
    def _read() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values]
                idle = ticks[3] + ticks[4]  # idle + iowait
                out[int(name[3:])] = (sum(ticks[:8]), idle)
        return out

    def start(self) -> None:
        self._start, self._t0 = self._read(), time.monotonic()

    def busy_seconds_each(self) -> dict[int, float]:
        """Busy seconds of each core since `start()` (all processes; clock-tick resolution)."""
        now = self._read()
        busy = {}
        for core in self.cores:
            total0, idle0 = self._start[core]
            total1, idle1 = now[core]
            busy[core] = ((total1 - total0) - (idle1 - idle0)) / CLK_TCK
        return busy


class Service:
    """A process the benchmark runs for a while: started pinned, stopped by its pid."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cores: str,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["taskset", "-c", cores, *argv],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        """Until `url` answers with any HTTP status (the process is up and listening)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer at {url} within {timeout:.0f} s; see {self.log}")

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout:.0f} s; see {self.log}")

    def stop(self, grace: float = 10.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                # Only this service's own process group: it was started in a new session.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._out.close()
