"""The simulator as a real process: the mock's API, prefix-cache hits on /metrics, bad arguments."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sim_url() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "sim-upstream",
            "--port",
            str(port),
            "--time-scale",
            "10",
            "--kv-blocks",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    resp.read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _post(url: str, body: dict[str, object]) -> tuple[int, bytes]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


SYSTEM = " ".join(f"rule{i}" for i in range(200))


def test_streams_with_usage_and_counts_prefix_cache_hits(sim_url: str) -> None:
    for question in ("first question here", "second question here"):
        body = {
            "model": "m",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 5,
        }
        status, raw = _post(sim_url, body)
        assert status == 200
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage == {"prompt_tokens": 205, "completion_tokens": 5, "total_tokens": 210}
        text = "".join(
            c["delta"].get("content", "") for e in events[:-1] for c in json.loads(e)["choices"] if "delta" in c
        )
        assert len(text.split()) == 5
    # system + 200 words = 201 tokens: 12 full blocks shared by both prompts.
    assert _metric(sim_url, "vllm:prefix_cache_hits_total") == 12 * 16
    assert _metric(sim_url, "vllm:prefix_cache_queries_total") == 2 * 205
    assert _metric(sim_url, "vllm:num_requests_running") == 0
    assert _metric(sim_url, "vllm:time_to_first_token_seconds_count") == 2


def test_json_answer_and_bad_requests(sim_url: str) -> None:
    status, raw = _post(sim_url, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert status == 200
    answer = json.loads(raw)
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
    status, raw = _post(sim_url, {"model": "m"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "messages"
    too_big = {"model": "m", "messages": [{"role": "user", "content": "w " * 2000}]}
    status, raw = _post(sim_url, too_big)  # 2001 tokens need 127 blocks; the server has 64
    assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("arg", [["--kv-blocks", "0"], ["--time-scale", "0"], ["--max-num-seqs", "x"]])
def test_bad_arguments_exit_2_naming_the_argument(arg: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "sim-upstream", *arg], check=False, capture_output=True, timeout=20
    )
    assert proc.returncode == 2 and arg[0].encode() in proc.stderr
