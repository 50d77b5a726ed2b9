"""The one-command benchmark: start everything, measure three targets, write `BENCHMARKS.md`.

Targets, measured in the same run and interleaved (each repeat goes through every target
before the next repeat, in a rotated order):
  direct       the upstream itself: nginx `return 200` (JSON) or `bench/sse_upstream.py` (SSE: the
               mock upstream's streams, from a server cheap enough to leave the load core room);
  passthrough  `bench/passthrough.py`, the floor: aiohttp with no features, pinned to core 0;
  gateway      `liutong-gateway serve` with every feature on (auth against Redis through its key
               cache, rpm + tpm + concurrency limits in Redis, metrics, the JSON access log to
               a file, usage records), pinned to core 0.
Everything else (redis-server, nginx, the SSE upstream, the load clients, this script) runs
on core 1. Every address is 127.0.0.1; every load is bounded in requests and seconds.

    .venv/bin/python -m bench [--quick] [--repeats N] [--output BENCHMARKS.md] [--label current]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench import procs, profile, report
from bench.procs import CoreLoad, Service, free_port

REPO = Path(__file__).resolve().parent.parent
PROXY_CORE, OTHER_CORE = "0", "1"
TARGETS = ("direct", "passthrough", "gateway")
JSON_MODEL, SSE_MODEL = "bench-json", "bench-sse"
# Huge, so that nothing is refused, but every limit is still evaluated on every request.
LIMITS = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "max_concurrent": 100_000}
NGINX_ANSWER = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-json",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":21,"completion_tokens":2,"total_tokens":23}}'
)
APT_TOOLS = {"wrk": "wrk", "nginx": "nginx-light", "redis-server": "redis-server", "taskset": "util-linux"}


@dataclass(frozen=True)
class Plan:
    repeats: int
    throughput_seconds: int
    latency_seconds: int
    rate_seconds: float
    sse_small_rounds: int
    sse_large_rounds: int
    profile_seconds: int
    warmup_seconds: int


FULL = Plan(repeats=3, throughput_seconds=8, latency_seconds=6, rate_seconds=10, sse_small_rounds=3,
            sse_large_rounds=2, profile_seconds=12, warmup_seconds=3)  # fmt: skip
QUICK = Plan(repeats=1, throughput_seconds=5, latency_seconds=4, rate_seconds=5, sse_small_rounds=1,
             sse_large_rounds=1, profile_seconds=6, warmup_seconds=1)  # fmt: skip

# name → (streams, token events per stream, ms between events)
SSE_SCENARIOS = {"sse_small": (100, 100, 10), "sse_large": (500, 100, 50)}


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def check_tools(need_profiler: bool) -> tuple[dict[str, str], str | None]:
    """Paths of the tools, or exit 2 printing exactly what to install."""
    found = {tool: _which(tool) for tool in APT_TOOLS}
    missing = [APT_TOOLS[t] for t, path in found.items() if path is None]
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or _which("py-spy")
    problems = []
    if missing:
        problems.append(f"apt-get update && apt-get install -y {' '.join(missing)}")
    if need_profiler and py_spy is None:
        problems.append(f"{sys.executable} -m pip install py-spy   (or run with --no-profile)")
    try:
        import uvloop  # noqa: F401
    except ImportError:
        problems.append(f"{sys.executable} -m pip install -e {REPO}   (the gateway and its uvloop)")
    if problems:
        print("bench: missing tools; install them with:\n  " + "\n  ".join(problems), file=sys.stderr)
        print("(bash bench/run.sh installs them itself)", file=sys.stderr)
        sys.exit(2)
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 cores (the proxy on core 0, everything else on core 1)", file=sys.stderr)
        sys.exit(2)
    return {t: p for t, p in found.items() if p}, py_spy


# --- the processes ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan, tools: dict[str, str], py_spy: str | None) -> None:
        self.args = args
        self.plan = plan
        self.tools = tools
        self.py_spy = py_spy
        self.stack = contextlib.ExitStack()
        self.dir = Path(tempfile.mkdtemp(prefix="liutong-bench-"))
        self.services: dict[str, Service] = {}
        self.ports: dict[str, int] = {}
        self.key = ""
        self.gateway_answers = 0  # requests the gateway answered to a client, for the usage check
        self.warnings: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("LIUTONG_", "PROMETHEUS_"))}

    # Each service is stopped by its own pid when the stack closes (also on errors and Ctrl-C).
    def start(self, name: str, argv: list[str], cores: str, **kw: Any) -> Service:
        service = Service(name, argv, cores=cores, log=self.dir / f"{name}.log", **kw)
        self.services[name] = service
        self.stack.callback(service.stop)
        return service

    def gateway_cmd(self, *args: str, src: Path | None = None) -> tuple[list[str], dict[str, str], str | None]:
        """argv, environment and cwd of a `liutong-gateway` command: from the checkout `src` (or
        `--gateway-src`) with `python -m gateway` (its own `.venv` if it has one), else the
        installed `--gateway-bin`."""
        src = src or self.args.gateway_src
        if src:
            env = {**self.env, "PYTHONPATH": str(src)}
            own = Path(src) / ".venv" / "bin" / "python"  # a checkout with its own environment
            return [str(own) if own.exists() else sys.executable, "-m", "gateway", *args], env, str(src)
        return [str(self.args.gateway_bin), *args], self.env, None

    def gateway_argv(self, config: Path, port: int, *extra: str, src: Path | None = None) -> tuple[list[str], dict[str, str], str | None]:
        return self.gateway_cmd("serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                *extra, src=src)  # fmt: skip

    def start_gateway(self, name: str, src: Path | None = None) -> Service:
        """A gateway (every feature on) pinned to core 0, serving on `self.ports[name]`."""
        self.ports[name] = free_port()
        argv, env, cwd = self.gateway_argv(self.config, self.ports[name], src=src)
        return self.start(name, argv, PROXY_CORE, env=env, cwd=cwd)

    def setup(self, gateways: dict[str, Path | None] | None = None, passthrough: bool = True) -> None:
        """Redis, nginx, the SSE upstream, a key, the config; then the gateways and the pass-throughs."""
        self.setup_infra()
        started = [self.start_gateway(name, src) for name, src in (gateways or {"gateway": None}).items()]
        if passthrough:
            for name, upstream in (("pass_json", "nginx"), ("pass_sse", "sse")):
                self.ports[name] = free_port()
                self.start(name, [sys.executable, "-m", "bench.passthrough", "--upstream",
                                  f"http://127.0.0.1:{self.ports[upstream]}", "--port", str(self.ports[name])],
                           PROXY_CORE, cwd=str(REPO), env=self.env)  # fmt: skip
        for gateway in started:
            gateway.wait_http(f"http://127.0.0.1:{self.ports[gateway.name]}/readyz")
        if passthrough:
            for name in ("pass_json", "pass_sse"):
                self.services[name].wait_port(self.ports[name])
        self._smoke([g.name for g in started] + (["direct", "passthrough"] if passthrough else []))

    def setup_infra(self) -> None:
        d = self.dir
        for name in ("redis", "nginx", "sse"):
            self.ports[name] = free_port()
        redis = self.start("redis", [self.tools["redis-server"], "--port", str(self.ports["redis"]), "--bind",
                                     "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)], OTHER_CORE)  # fmt: skip
        nginx_conf = d / "nginx.conf"
        nginx_conf.write_text(_nginx_conf(d, self.ports["nginx"]))
        nginx = self.start("nginx", [self.tools["nginx"], "-p", str(d), "-c", str(nginx_conf), "-e",
                                     str(d / "nginx-error.log")], OTHER_CORE)  # fmt: skip
        sse = self.start("sse", [sys.executable, "-m", "bench.sse_upstream", "--host", "127.0.0.1", "--port",
                                 str(self.ports["sse"])], OTHER_CORE, cwd=str(REPO), env=self.env)  # fmt: skip
        redis.wait_port(self.ports["redis"])
        nginx.wait_http(f"http://127.0.0.1:{self.ports['nginx']}/")
        sse.wait_http(f"http://127.0.0.1:{self.ports['sse']}/health")

        self.redis_url = f"redis://127.0.0.1:{self.ports['redis']}/0"
        argv, env, cwd = self.gateway_cmd("keys", "create", "--name", "bench", "--json")
        created = subprocess.run(argv, env={**env, "LIUTONG_REDIS_URL": self.redis_url}, cwd=cwd,
                                 capture_output=True, check=True, timeout=60)  # fmt: skip
        self.key = orjson.loads(created.stdout)["key"]

        self.config = d / "gateway.yaml"
        self.config.write_text(yaml.safe_dump({
            "redis_url": self.redis_url,
            "models": {JSON_MODEL: {"upstreams": [f"http://127.0.0.1:{self.ports['nginx']}"]},
                       SSE_MODEL: {"upstreams": [f"http://127.0.0.1:{self.ports['sse']}"]}},
            "limits": {"default": LIMITS},
            "log_level": "info",
        }))  # fmt: skip

    def _smoke(self, targets: list[str]) -> None:
        """One request of each kind through every target, so that a broken setup fails loudly."""
        for target in targets:
            result = self.wrk(self.url(target, False), 1, 1)
            if result["requests"] == 0 or result["status_errors"] or result["connect_errors"]:
                raise RuntimeError(f"smoke test failed for {target}: {result}; logs in {self.dir}")
            result = self.sse(self.url(target, True), 4, 5, 1, 1)
            if result["failed_streams"] or result["events_lost"] or result["streams_wrong_content"]:
                raise RuntimeError(f"SSE smoke test failed for {target}: {result}; logs in {self.dir}")

    def url(self, target: str, sse: bool) -> str:
        """`direct`, `passthrough` or the name of a gateway service."""
        port = {"direct": "sse" if sse else "nginx", "passthrough": "pass_sse" if sse else "pass_json"}.get(target, target)
        return f"http://127.0.0.1:{self.ports[port]}/v1/chat/completions"

    def proxy_pid(self, target: str, sse: bool) -> int | None:
        """The process under test on core 0 (none when the client talks to the upstream)."""
        if target == "passthrough":
            return self.services["pass_sse" if sse else "pass_json"].pid
        return None if target == "direct" else self.services[target].pid

    # --- load generators (all on core 1, all bounded) ----------------------------------------

    def wrk(self, url: str, connections: int, seconds: int, model: str = JSON_MODEL) -> dict[str, Any]:
        argv = ["taskset", "-c", OTHER_CORE, self.tools["wrk"], "-t1", f"-c{connections}", f"-d{seconds}s",
                "--timeout", "5s", "-s", str(REPO / "bench/wrk/post.lua"), url]  # fmt: skip
        env = {**self.env, "WRK_KEY": self.key, "WRK_MODEL": model}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
        for line in done.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                result = orjson.loads(line[len("BENCH_JSON ") :])
                result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
                result["_requests"] = result["requests"]
                if url.endswith(f":{self.ports.get('gateway')}/v1/chat/completions"):
                    self.gateway_answers += result["requests"]
                return result
        raise RuntimeError(f"wrk printed no summary (exit {done.returncode}): {done.stderr.strip()}")

    def _client(self, module: str, *args: str, timeout: float) -> dict[str, Any]:
        argv = ["taskset", "-c", OTHER_CORE, sys.executable, "-m", module, *args, "--key", self.key]
        done = subprocess.run(argv, cwd=str(REPO), env=self.env, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{module} failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return orjson.loads(done.stdout)

    def openloop(self, url: str, rate: float, seconds: float) -> dict[str, Any]:
        result = self._client("bench.openloop", "--url", url, "--rate", str(rate), "--duration", str(seconds),
                              "--model", JSON_MODEL, timeout=seconds + 90)  # fmt: skip
        if url.endswith(f":{self.ports.get('gateway')}/v1/chat/completions"):
            self.gateway_answers += result["answered"] + 4 * 25  # and the warm-up requests
        return result

    def sse(self, url: str, streams: int, events: int, interval_ms: int, rounds: int) -> dict[str, Any]:
        length = events * interval_ms / 1000
        result = self._client("bench.sse_load", "--url", url, "--streams", str(streams), "--events", str(events),
                              "--interval-ms", str(interval_ms), "--rounds", str(rounds), "--model", SSE_MODEL,
                              timeout=length * (rounds + 1) * 3 + 120)  # fmt: skip
        if url.endswith(f":{self.ports.get('gateway')}/v1/chat/completions"):
            self.gateway_answers += result["streams"] - result["failed_streams"]
        return result

    # --- one observed measurement ------------------------------------------------------------

    def observe(self, pid: int | None, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `load` while watching the proxy's CPU and RSS and how busy both cores were."""
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                if pid is not None:
                    peak[0] = max(peak[0], procs.rss_bytes(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        cores = CoreLoad([0, 1])
        cpu0 = procs.cpu_seconds(pid) if pid else 0.0
        cores.start()
        started = time.monotonic()
        sampler.start()
        try:
            result = load()
        finally:
            stop.set()
            sampler.join()
        wall = time.monotonic() - started
        busy = cores.busy_seconds_each()
        cpu = (procs.cpu_seconds(pid) - cpu0) if pid else None
        result["_wall_s"] = wall
        result["_proxy_cpu_s"] = cpu
        result["_proxy_peak_rss"] = peak[0] or None
        result["_core0_busy"] = busy[0] / wall
        result["_core1_busy"] = busy[1] / wall
        # Core 0 time the proxy did not use: other processes (other engineers' tests) took it.
        result["_core0_foreign"] = max(0.0, busy[0] - (cpu or 0.0)) / wall
        if cpu and result.get("_requests"):
            result["_per_cpu_s"] = result["_requests"] / cpu  # requests per CPU-second of the proxy
        return result


def _nginx_conf(d: Path, port: int) -> str:
    return f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{NGINX_ANSWER}';
        }}
    }}
}}
"""


# --- the run ---------------------------------------------------------------------------------


def measure_all(b: Bench, results: dict[str, dict[str, list[dict[str, Any]]]], log: Callable[[str], None]) -> None:
    plan = b.plan
    log(f"warm-up ({plan.warmup_seconds} s per proxy)")
    for target in ("passthrough", "gateway"):
        b.wrk(b.url(target, False), 64, plan.warmup_seconds)
        b.sse(b.url(target, True), 50, 20, 5, 1)

    def add(scenario: str, target: str, value: dict[str, Any]) -> None:
        results.setdefault(scenario, {}).setdefault(target, []).append(value)

    for r in range(plan.repeats):
        order = TARGETS[r % 3 :] + TARGETS[: r % 3]
        log(f"repeat {r + 1}/{plan.repeats} (order: {', '.join(order)})")
        for target in order:
            pid = b.proxy_pid(target, False)
            add("throughput", target, b.observe(pid, lambda t=target: b.wrk(b.url(t, False), 64, plan.throughput_seconds)))
            log(f"  throughput  {target:12} {results['throughput'][target][-1]['rps']:9.0f} req/s")
        for target in order:
            pid = b.proxy_pid(target, False)
            add("latency8", target, b.observe(pid, lambda t=target: b.wrk(b.url(t, False), 8, plan.latency_seconds)))
            got = results["latency8"][target][-1]
            log(f"  8 conns     {target:12} p50 {got['p50_us'] / 1000:.3f} ms  p99 {got['p99_us'] / 1000:.3f} ms")
        for target in order:
            pid = b.proxy_pid(target, False)
            add("rate100", target, b.observe(pid, lambda t=target: b.openloop(b.url(t, False), 100, plan.rate_seconds)))
            got = results["rate100"][target][-1]
            log(f"  100 req/s   {target:12} p50 {got['p50_ms']:.3f} ms  p99 {got['p99_ms']:.3f} ms")
        for scenario, (streams, events, interval) in SSE_SCENARIOS.items():
            rounds = plan.sse_small_rounds if scenario == "sse_small" else plan.sse_large_rounds
            for target in order:
                pid = b.proxy_pid(target, True)
                add(scenario, target, b.observe(pid, lambda t=target, s=streams, e=events, i=interval, n=rounds:
                                                b.sse(b.url(t, True), s, e, i, n)))  # fmt: skip
                got = results[scenario][target][-1]
                cpu = got["_proxy_cpu_s"]
                per_k = f"{cpu * 1000 / (got['events_received'] / 1000):.1f} ms/1k events" if cpu is not None else ""
                log(f"  {scenario:11} {target:12} TTFT p50 {got['ttft_p50_ms']:.2f} p99 {got['ttft_p99_ms']:.2f} ms"
                    f"  lost {got['events_lost']} merged {got['events_merged']}  {per_k}")  # fmt: skip


def run_profiles(b: Bench, log: Callable[[str], None]) -> dict[str, str]:
    """py-spy on the gateway (and the pass-through, for the floor) under load; rendered tables."""
    if b.py_spy is None or b.args.no_profile:
        return {}
    seconds = b.plan.profile_seconds
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    rendered: dict[str, str] = {}
    jobs = [
        ("gateway_json", "gateway", lambda: b.wrk(b.url("gateway", False), 64, seconds + 2)),
        ("gateway_sse", "gateway", lambda: b.sse(b.url("gateway", True), 500, 100, 50, 1)),
        ("passthrough_json", "pass_json", lambda: b.wrk(b.url("passthrough", False), 64, seconds + 2)),
    ]
    for name, service, load in jobs:
        raw = out_dir / f"profile-{re.sub(r'[^A-Za-z0-9_.-]+', '-', b.args.label)[:60]}-{name}.raw"
        raw.unlink(missing_ok=True)
        spy = profile.record(b.services[service].pid, seconds, raw, py_spy=b.py_spy)
        time.sleep(0.5)
        load()
        try:
            _, err = spy.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            spy.terminate()
            _, err = spy.communicate(timeout=10)
        if not raw.exists():
            b.warnings.append(f"py-spy wrote no profile for {name}: {err.decode(errors='replace').strip()[-300:]}")
            continue
        rendered[name] = profile.render(profile.summarise(raw), name)
        log(f"  profiled {name}: {raw.relative_to(REPO)}")
    return rendered


def workers_scaling(b: Bench, log: Callable[[str], None]) -> dict[str, Any]:
    """One worker (core 0) against `serve --workers 2` (cores 0 and 1), interleaved, when
    `serve --workers` exists."""
    help_argv, env, cwd = b.gateway_cmd("serve", "--help")
    shown = subprocess.run(help_argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if "--workers" not in shown.stdout:
        return {"status": "not measured: --workers not available (`liutong-gateway serve --help` has no --workers)"}
    for name, cores, extra in (("gateway_1w", PROXY_CORE, ()), ("gateway_2w", f"{PROXY_CORE},{OTHER_CORE}", ("--workers", "2"))):
        b.ports[name] = free_port()
        argv, env, cwd = b.gateway_argv(b.config, b.ports[name], *extra)
        b.start(name, argv, cores, env=env, cwd=cwd)
    for name in ("gateway_1w", "gateway_2w"):
        b.services[name].wait_http(f"http://127.0.0.1:{b.ports[name]}/readyz")
        b.wrk(b.url(name, False), 64, b.plan.warmup_seconds)
    runs: dict[str, list[dict[str, Any]]] = {"gateway_1w": [], "gateway_2w": []}
    for r in range(b.plan.repeats):
        for name in (("gateway_1w", "gateway_2w") if r % 2 == 0 else ("gateway_2w", "gateway_1w")):
            pid = b.services[name].pid
            runs[name].append(b.observe(pid, lambda n=name: b.wrk(b.url(n, False), 64, b.plan.throughput_seconds)))
    for name in runs:
        b.services[name].stop()
    log("  1 worker: " + ", ".join(f"{r['rps']:.0f}" for r in runs["gateway_1w"]) + " req/s; 2 workers: "
        + ", ".join(f"{r['rps']:.0f}" for r in runs["gateway_2w"]) + " req/s")  # fmt: skip
    return {"status": "measured", "one": runs["gateway_1w"], "two": runs["gateway_2w"], "cores": os.cpu_count() or 0}


def usage_check(b: Bench) -> dict[str, Any]:
    """Stop the gateway (it flushes its usage writer) and count the records in Redis."""
    import redis

    b.services["gateway"].stop(grace=60)
    client = redis.Redis(host="127.0.0.1", port=b.ports["redis"])
    try:
        records = int(client.xlen("liutong:{usage}:records"))
    finally:
        client.close()
    return {"records": records, "answered": b.gateway_answers}


def log_problems(b: Bench) -> list[str]:
    """The gateway's warning and error log events, counted by event and error."""
    counts: dict[str, int] = {}
    for name in ("gateway", "gateway_1w", "gateway_2w"):
        path = b.dir / f"{name}.log"
        if not path.exists():
            continue
        with path.open("rb") as fh:
            for line in fh:
                if b'"level":"info"' in line or b'"level":"debug"' in line:
                    continue
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    text = line.decode(errors="replace").strip()[:160]
                    counts[f"{name}: {text}"] = counts.get(f"{name}: {text}", 0) + 1
                    continue
                if not isinstance(event, dict) or event.get("level") not in ("warning", "error", "critical"):
                    continue
                detail = event.get("error") or str(event.get("exception") or "").strip().splitlines()[-1:] or ""
                if isinstance(detail, list):
                    detail = detail[0] if detail else ""
                what = f"{name}: {event.get('level')} `{event.get('event')}`" + (f" ({str(detail)[:200]})" if detail else "")
                counts[what] = counts.get(what, 0) + 1
    return [f"{what} × {n}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1])[:12]]


def machine() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    os_name = next((ln.split("=", 1)[1].strip('"') for ln in Path("/etc/os-release").read_text().splitlines()
                    if ln.startswith("PRETTY_NAME=")), platform.system())  # fmt: skip
    versions = []
    for dist in ("aiohttp", "uvloop", "orjson", "redis", "prometheus_client", "structlog"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    commit = first(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "gateway"], capture_output=True,
                           text=True, timeout=10).stdout.strip()  # fmt: skip
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{int(mem) / 1024 / 1024:.1f} GiB",
        "os": f"{os_name}, Linux {platform.release()}",
        "python": f"Python {platform.python_version()} ({sys.executable})",
        "packages": ", ".join(versions),
        "tools": "; ".join([first(["redis-server", "--version"]).split(" sha=")[0], first([_which("nginx") or "nginx", "-v"]),
                            first([_which("wrk") or "wrk", "--version"]).split(" Copyright")[0]]),  # fmt: skip
        "commit": commit + (" with uncommitted changes in gateway/" if dirty else ""),
    }


def export_revision(rev: str, into: Path) -> Path:
    """`git archive REV` unpacked under `into`: that revision's files, untouched by edits in progress."""
    target = into / "gateway-src"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True, timeout=120)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=120)
    return target


def pin_and_prioritise(nice: int) -> None:
    """This script and everything it starts: core 1 unless told otherwise, and `nice` priority
    (inherited), so that other processes on the machine (test suites) take less of the cores."""
    os.sched_setaffinity(0, {int(OTHER_CORE)})
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except PermissionError:
            print(f"bench: cannot raise priority to nice {nice} (not root); running at nice 0", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, shorter loads (~2 minutes)")
    parser.add_argument("--repeats", type=int, help="repeats of every measurement (default 3, --quick 1)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="the report to write")
    parser.add_argument("--label", default="current", help="the report section this run writes (others are kept)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--gateway-bin", type=Path, default=REPO / ".venv/bin/liutong-gateway")
    parser.add_argument("--gateway-src", type=Path, help="run `python -m gateway` from this checkout instead")
    parser.add_argument("--gateway-rev", help="measure this git revision (e.g. HEAD: the committed code, "
                        "without uncommitted edits), exported with `git archive` to a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--nice", type=int, default=-10,
                        help="priority of everything the benchmark runs (default -10; 0 to share equally)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.repeats:
        if not 1 <= args.repeats <= 10:
            parser.error("--repeats must be between 1 and 10")
        plan = Plan(**{**asdict(plan), "repeats": args.repeats})
    tools, py_spy = check_tools(need_profiler=not args.no_profile)
    command = os.environ.get("BENCH_COMMAND") or shlex.join(["python", "-m", "bench", *(argv or sys.argv[1:])])

    pin_and_prioritise(args.nice)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    b = Bench(args, plan, tools, py_spy)
    info = machine()
    if args.gateway_rev:
        if args.gateway_src:
            parser.error("--gateway-rev and --gateway-src exclude each other")
        args.gateway_src = export_revision(args.gateway_rev, b.dir)
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.gateway_rev], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        info["commit"] = f"{rev} (`--gateway-rev {args.gateway_rev}`: committed code only)"
    elif args.gateway_src:
        info["commit"] = f"gateway from {args.gateway_src} (PYTHONPATH); bench at {info['commit']}"
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with b.stack:
        log(f"starting redis-server, nginx, the SSE upstream, the pass-through and the gateway in {b.dir}")
        b.setup()
        measure_all(b, results, log)
        log("profiling")
        profiles = run_profiles(b, log)
        log("usage records check")
        usage = usage_check(b)
        log("workers scaling")
        workers = workers_scaling(b, log)
        b.warnings += [f"gateway log: {p}" for p in log_problems(b)]
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    elapsed = time.monotonic() - started
    raw_out = REPO / "bench" / "out" / f"results-{time.strftime('%Y%m%dT%H%M%S')}.json"
    raw_out.parent.mkdir(exist_ok=True)
    raw_out.write_bytes(orjson.dumps({"plan": asdict(plan), "machine": info, "results": results,
                                      "workers": workers, "usage": usage}, option=orjson.OPT_INDENT_2))  # fmt: skip
    section = report.render(
        label=args.label, command=command, plan=asdict(plan), machine=info, results=results, profiles=profiles,
        workers=workers, usage=usage, warnings=b.warnings, load=(load_before, load_after), elapsed=elapsed,
    )  # fmt: skip
    report.write(args.output, args.label, section)
    print(section)
    log(f"wrote {args.output} (section {args.label!r}) and {raw_out.relative_to(REPO)}")
    if not args.keep:
        shutil.rmtree(b.dir, ignore_errors=True)
    else:
        log(f"kept {b.dir}")
    return 0
