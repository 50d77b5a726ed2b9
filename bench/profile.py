"""Profile a running process with py-spy and summarise where its CPU time goes.

`record(pid, seconds, out)` samples the process (py-spy's raw "collapsed stacks" format) while
the caller drives load, keeping only samples of the thread that holds the GIL: the shares are
of the Python process's CPU time, not of threads that merely wait (the log writer, an
executor's idle workers, which a sampler otherwise counts as busy whenever they are runnable); `summarise`
reads the stacks back into the top functions by own time ("self": the innermost Python frame,
which includes the C code it called) and by time spent inside them ("total"), and the own time
of each package (gateway, aiohttp, redis, prometheus_client, structlog, asyncio, ...).

    python -m bench.profile STACKS.raw    # print the summary of a saved profile
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


@dataclass(frozen=True)
class Summary:
    samples: int
    self_top: list[tuple[float, str]]
    total_top: list[tuple[float, str]]
    packages: list[tuple[float, str]]


def record(pid: int, seconds: float, out: Path, *, py_spy: str, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start py-spy on `pid` (and its child processes) for `seconds`; the caller waits on it."""
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
            "--format", "raw", "--nolineno", "--full-filenames", "--subprocesses", "--gil", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _short(path: str) -> str:
    for package in ("/gateway/", "/bench/"):
        at = path.rfind(package)
        if at >= 0 and "site-packages" not in path:
            return path[at + 1 :]
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        at = path.rfind(marker)
        if at >= 0:
            rest = path[at + len(marker) :]
            return rest.split("/", 1)[1] if marker == "/lib/python3." and "/" in rest else rest
    return path.rsplit("/", 2)[-1] if "/" in path else path


def _package(path: str) -> str:
    short = _short(path)
    if short.startswith("<"):
        return short
    head = short.split("/", 1)[0]
    return head[:-3] if head.endswith(".py") else head


def _frame(raw: str) -> tuple[str, str]:
    match = _FRAME.match(raw.strip())
    if not match:
        return raw.strip(), "?"
    return match["func"], match["file"]


def summarise(path: Path, top: int = 15) -> Summary:
    own: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        func, file = frames[-1]
        own[f"{func} ({_short(file)})"] += count
        packages[_package(file)] += count
        for name in {f"{f} ({_short(p)})" for f, p in frames}:
            inside[name] += count

    def share(counter: Counter[str], n: int) -> list[tuple[float, str]]:
        return [(100.0 * c / samples, name) for name, c in counter.most_common(n)] if samples else []

    return Summary(samples, share(own, top), share(inside, top + 25), share(packages, 12))


def render(summary: Summary, title: str) -> str:
    lines = [f"**{title}** — {summary.samples} samples holding the GIL", ""]
    if not summary.samples:
        return "\n".join([*lines, "(no samples: the profiler could not attach)", ""])
    lines += ["| own time | function (file) |", "|---:|---|"]
    lines += [f"| {pct:.1f} % | `{name}` |" for pct, name in summary.self_top]
    lines += ["", "| own time | package |", "|---:|---|"]
    lines += [f"| {pct:.1f} % | {name} |" for pct, name in summary.packages]
    # The frames every sample passes through (the event loop, the middleware chain) say nothing.
    inclusive = [(p, n) for p, n in summary.total_top if p < 60.0]
    lines += ["", "| in it (inclusive) | function (file) |", "|---:|---|"]
    lines += [f"| {pct:.1f} % | `{name}` |" for pct, name in inclusive[:15]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(render(summarise(Path(arg)), arg))
