"""The command line (CONTRACT §5, and §4 for what `keys` leaves in the store), run as a user runs
it: `python -m gateway …` (and the `liutong-gateway` console script) as a subprocess, against the
session's real `redis-server`, with the process environment stripped of every `LIUTONG_*`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.conftest import REPO, GatewayFactory, RedisServer, auth, chat_body, free_port

KEY_RE = re.compile(r"lt_[A-Za-z0-9]{32,}")
SEED_REQUEST = {
    "model": "crimson-falcon-4",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain quantum entanglement in simple terms."},
    ],
    "temperature": 0.7,
    "max_tokens": 512,
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIUTONG_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, redis_url: str | None = None, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    if env is None:
        env = clean_env(**({"LIUTONG_REDIS_URL": redis_url} if redis_url else {}))
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, encoding="utf-8", errors="replace", env=env, cwd=REPO, timeout=timeout,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def create_key(redis_url: str, name: str, *options: str) -> dict[str, Any]:
    data = json.loads(ok(run_cli("keys", "create", "--name", name, *options, "--json", redis_url=redis_url)).stdout)
    assert isinstance(data, dict)
    return data


def show(redis_url: str, key_id: str) -> dict[str, Any]:
    data = json.loads(ok(run_cli("keys", "show", key_id, "--json", redis_url=redis_url)).stdout)
    assert isinstance(data, dict)
    return data


def redis_dump(client: redis.Redis) -> tuple[list[bytes], bytes]:
    """Every key name in the database, and every name, field and value concatenated."""
    names: list[bytes] = []
    blob = b""
    for name in client.scan_iter("*"):
        names.append(name)
        blob += name + b"\0"
        kind = client.type(name)
        if kind == b"hash":
            for field, value in client.hgetall(name).items():
                blob += field + b"\0" + value + b"\0"
        elif kind == b"string":
            blob += (client.get(name) or b"") + b"\0"
        elif kind == b"set":
            blob += b"\0".join(client.smembers(name)) + b"\0"
        elif kind == b"zset":
            blob += b"\0".join(client.zrange(name, 0, -1)) + b"\0"
        elif kind == b"list":
            blob += b"\0".join(client.lrange(name, 0, -1)) + b"\0"
        elif kind == b"stream":
            for _, entry in client.xrange(name):
                for field, value in entry.items():
                    blob += field + b"\0" + value + b"\0"
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} for {name!r}")
    return names, blob


def stored_names(server: RedisServer) -> list[bytes]:
    client = server.client()
    try:
        return list(client.scan_iter("*"))
    finally:
        client.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Long-running CLI processes started by a test; killed at teardown if still alive."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


# --- keys create ----------------------------------------------------------------------------


def test_create_json_stores_only_the_digest(redis_url: str, redis_server: RedisServer) -> None:
    before = time.time()
    data = create_key(
        redis_url, "N", "--org", "O", "--models", "a,b", "--rpm", "5", "--tpm", "100",
        "--max-concurrent", "2", "--expires-in", "30d",
    )  # fmt: skip
    key, key_id = data["key"], data["key_id"]
    assert KEY_RE.fullmatch(key), key
    assert isinstance(key_id, str) and key_id and key not in key_id

    record = show(redis_url, key_id)
    assert record["key_id"] == key_id
    assert record["name"] == "N"
    assert record["org"] == "O"
    assert record["models"] == ["a", "b"]
    assert (record["rpm"], record["tpm"], record["max_concurrent"]) == (5, 100, 2)
    assert record["disabled"] is False
    assert before + 30 * 86400 - 5 <= record["expires_at"] <= time.time() + 30 * 86400 + 5
    assert "key" not in record and "digest" not in record
    assert key not in json.dumps(record)

    client = redis_server.client()
    try:
        names, blob = redis_dump(client)
    finally:
        client.close()
    assert names, "keys create wrote nothing to Redis"
    assert all(n.startswith(b"liutong:") for n in names), names
    assert key.encode() not in blob, "the plaintext key is stored in Redis"
    assert key[3:].encode() not in blob, "the key's secret part is stored in Redis"
    sha = hashlib.sha256(key.encode())
    assert sha.hexdigest().encode() in blob or sha.digest() in blob, "the key's SHA-256 digest is not in Redis"


def test_create_plain_prints_only_the_key(redis_url: str) -> None:
    result = ok(run_cli("keys", "create", "--name", "plain", redis_url=redis_url))
    assert KEY_RE.fullmatch(result.stdout.rstrip("\n")), repr(result.stdout)
    assert result.stdout.count("\n") == 1, f"stdout is not exactly the key line: {result.stdout!r}"
    key = result.stdout.strip()
    assert key not in result.stderr
    listed = json.loads(ok(run_cli("keys", "list", "--json", redis_url=redis_url)).stdout)
    assert len(listed) == 1
    key_id = listed[0]["key_id"]
    assert key_id in result.stderr, f"key_id {key_id} not reported on stderr: {result.stderr!r}"


def test_redis_url_flag(redis_url: str, redis_server: RedisServer) -> None:
    data = json.loads(
        ok(run_cli("keys", "create", "--name", "by-flag", "--json", "--redis-url", redis_url, env=clean_env())).stdout
    )
    # The flag wins over the environment.
    bogus = f"redis://127.0.0.1:{free_port()}/0"
    listed = json.loads(
        ok(run_cli("keys", "list", "--json", "--redis-url", redis_url, env=clean_env(LIUTONG_REDIS_URL=bogus))).stdout
    )
    assert [r["key_id"] for r in listed] == [data["key_id"]]
    client = redis_server.client()
    try:
        assert data["key_id"].encode() in redis_dump(client)[1], "the key was not written to --redis-url"
    finally:
        client.close()


def test_config_file_redis_url(redis_url: str, redis_server: RedisServer, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"redis_url: {redis_url}\n", encoding="utf-8")
    by_flag = json.loads(
        ok(run_cli("keys", "create", "--name", "cfg", "--config", str(config), "--json", env=clean_env())).stdout
    )
    # LIUTONG_CONFIG names the same file for a command without --config.
    listed = json.loads(ok(run_cli("keys", "list", "--json", env=clean_env(LIUTONG_CONFIG=str(config)))).stdout)
    assert [r["key_id"] for r in listed] == [by_flag["key_id"]]


def test_two_keys_differ(redis_url: str) -> None:
    first = create_key(redis_url, "one")
    second = create_key(redis_url, "two")
    assert first["key"] != second["key"]
    assert first["key_id"] != second["key_id"]


# --- keys list / show / update / revoke -----------------------------------------------------


def test_list_table_and_json(redis_url: str) -> None:
    alpha = create_key(redis_url, "alpha", "--org", "acme", "--rpm", "11")
    beta = create_key(redis_url, "beta", "--models", "indigo-owl-4")

    listed = json.loads(ok(run_cli("keys", "list", "--json", redis_url=redis_url)).stdout)
    by_id = {r["key_id"]: r for r in listed}
    assert set(by_id) == {alpha["key_id"], beta["key_id"]}
    assert by_id[alpha["key_id"]]["name"] == "alpha"
    assert by_id[alpha["key_id"]]["org"] == "acme"
    assert by_id[alpha["key_id"]]["rpm"] == 11
    assert by_id[beta["key_id"]]["models"] == ["indigo-owl-4"]
    for record in listed:
        assert "key" not in record and "digest" not in record

    table = ok(run_cli("keys", "list", redis_url=redis_url)).stdout
    for data, name in ((alpha, "alpha"), (beta, "beta")):
        lines = [line for line in table.splitlines() if data["key_id"] in line]
        assert len(lines) == 1, table
        assert name in lines[0] and "active" in lines[0], lines[0]
    for text in (table, json.dumps(listed)):
        assert alpha["key"] not in text and beta["key"] not in text


def test_list_empty_store(redis_url: str) -> None:
    assert json.loads(ok(run_cli("keys", "list", "--json", redis_url=redis_url)).stdout) == []


def test_show(redis_url: str) -> None:
    data = create_key(redis_url, "shown", "--org", "acme")
    text = ok(run_cli("keys", "show", data["key_id"], redis_url=redis_url)).stdout
    assert data["key_id"] in text and "shown" in text and "acme" in text
    assert data["key"] not in text
    assert show(redis_url, data["key_id"])["status"] == "active"


@pytest.mark.parametrize("action", [("show",), ("revoke",), ("update", "--rpm", "3")])
def test_unknown_key_id(redis_url: str, redis_server: RedisServer, action: Sequence[str]) -> None:
    result = run_cli("keys", action[0], "key_doesnotexist", *action[1:], redis_url=redis_url)
    assert result.returncode != 0
    assert "key_doesnotexist" in result.stderr
    assert "Traceback" not in result.stderr
    assert stored_names(redis_server) == [], "a command on an unknown key_id wrote to the store"


def test_update_disable_enable(redis_url: str) -> None:
    data = create_key(redis_url, "toggled", "--rpm", "5", "--tpm", "100")
    ok(run_cli("keys", "update", data["key_id"], "--rpm", "9", "--disable", redis_url=redis_url))
    record = show(redis_url, data["key_id"])
    assert record["rpm"] == 9
    assert record["tpm"] == 100, "update changed a limit it was not asked to change"
    assert record["disabled"] is True
    assert record["status"] == "disabled"

    ok(run_cli("keys", "update", data["key_id"], "--enable", redis_url=redis_url))
    record = show(redis_url, data["key_id"])
    assert record["disabled"] is False
    assert record["status"] == "active"
    assert (record["rpm"], record["tpm"], record["name"]) == (9, 100, "toggled")


def test_update_disable_and_enable_together_is_refused(redis_url: str) -> None:
    data = create_key(redis_url, "both")
    result = run_cli("keys", "update", data["key_id"], "--disable", "--enable", redis_url=redis_url)
    assert result.returncode == 2
    assert "--disable" in result.stderr and "--enable" in result.stderr
    assert show(redis_url, data["key_id"])["disabled"] is False


def test_revoke(redis_url: str) -> None:
    data = create_key(redis_url, "doomed")
    other = create_key(redis_url, "bystander")
    result = ok(run_cli("keys", "revoke", data["key_id"], redis_url=redis_url))
    assert data["key_id"] in result.stdout + result.stderr
    assert show(redis_url, data["key_id"])["status"] == "revoked"
    assert show(redis_url, other["key_id"])["status"] == "active"
    # Revoked keys stay listed (for audit), marked as such.
    listed = {r["key_id"]: r for r in json.loads(ok(run_cli("keys", "list", "--json", redis_url=redis_url)).stdout)}
    assert listed[data["key_id"]]["status"] == "revoked"
    # Enabling a revoked key does not bring it back.
    ok(run_cli("keys", "update", data["key_id"], "--enable", redis_url=redis_url))
    assert show(redis_url, data["key_id"])["status"] == "revoked"


# --- the CLI's keys against a running gateway -----------------------------------------------


async def test_cli_key_works_and_revocation_reaches_gateway(
    make_gateway: GatewayFactory, redis_url: str, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway()
    assert gateway.state.settings.key_cache_ttl <= 2.0
    data = await asyncio.to_thread(create_key, redis_url, "via-cli")
    limited = await asyncio.to_thread(create_key, redis_url, "owl-only", "--models", "indigo-owl-4")
    url = gateway.url + "/v1/chat/completions"

    async with http.post(url, json=chat_body(), headers=auth(data["key"])) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["usage"]["total_tokens"] > 0
    async with http.post(url, json=chat_body("crimson-falcon-4"), headers=auth(limited["key"])) as resp:
        assert resp.status == 404, await resp.text()
        assert (await resp.json())["error"]["code"] == "model_not_found"
    async with http.post(url, json=chat_body("indigo-owl-4"), headers=auth(limited["key"])) as resp:
        assert resp.status == 200, await resp.text()

    await asyncio.to_thread(lambda: ok(run_cli("keys", "revoke", data["key_id"], redis_url=redis_url)))
    revoked_at = time.monotonic()
    status, body = 200, None
    while time.monotonic() - revoked_at < 3.0:
        async with http.post(url, json=chat_body(), headers=auth(data["key"])) as resp:
            status, body = resp.status, await resp.json()
        if status == 401:
            break
        assert status == 200, body
        await asyncio.sleep(0.1)
    assert status == 401, f"revoked key still accepted {time.monotonic() - revoked_at:.1f}s after `keys revoke`"
    assert body is not None and body["error"]["code"] == "invalid_api_key"
    # The other key is unaffected.
    async with http.post(url, json=chat_body("indigo-owl-4"), headers=auth(limited["key"])) as resp:
        assert resp.status == 200


# --- bad arguments, no store, unreachable store ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("keys", "create"), "--name"),
        (("keys", "create", "--name", "n", "--rpm", "-1"), "--rpm"),
        (("keys", "create", "--name", "n", "--rpm", "abc"), "--rpm"),
        (("keys", "create", "--name", "n", "--tpm", "1.5"), "--tpm"),
        (("keys", "create", "--name", "n", "--max-concurrent", "-3"), "--max-concurrent"),
        (("keys", "create", "--name", "n", "--expires-in", "10x"), "--expires-in"),
        (("keys", "create", "--name", "n", "--expires-in", "0d"), "--expires-in"),
        (("keys", "create", "--name", "n", "--expires-in", "d"), "--expires-in"),
        (("keys", "update", "key_x", "--rpm", "-5"), "--rpm"),
        (("keys", "show"), "key_id"),
        (("keys", "frobnicate"), "frobnicate"),
        (("frobnicate",), "frobnicate"),
        (("serve", "--port", "70000"), "--port"),
        (("serve", "--port", "http"), "--port"),
        (("mock-upstream", "--port", "70000"), "--port"),
    ],
)
def test_bad_arguments_exit_2(redis_url: str, redis_server: RedisServer, args: Sequence[str], names: str) -> None:
    result = run_cli(*args, redis_url=redis_url)
    assert result.returncode == 2, f"exit {result.returncode}; stderr: {result.stderr}"
    assert names in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 10, f"not a short message:\n{result.stderr}"
    assert result.stdout == ""
    assert stored_names(redis_server) == [], "a refused command wrote to the store"


@pytest.mark.parametrize("args", [("keys", "list"), ("keys", "create", "--name", "x"), ("keys", "show", "key_x")])
def test_keys_without_store_exit_2(args: Sequence[str]) -> None:
    result = run_cli(*args, env=clean_env())
    assert result.returncode == 2, f"exit {result.returncode}; stderr: {result.stderr}"
    assert "store" in result.stderr.lower()
    assert "--redis-url" in result.stderr or "LIUTONG_REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert not KEY_RE.search(result.stdout), "a key was printed that no store holds"


@pytest.mark.parametrize("args", [("keys", "list"), ("keys", "create", "--name", "x"), ("keys", "revoke", "key_x")])
def test_unreachable_store_exit_1(args: Sequence[str]) -> None:
    closed = free_port()
    started = time.monotonic()
    result = run_cli(*args, "--redis-url", f"redis://127.0.0.1:{closed}/0", env=clean_env())
    assert result.returncode == 1, f"exit {result.returncode}; stderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.stderr.strip(), "no message"
    assert len(result.stderr.splitlines()) <= 5, result.stderr
    assert "unreachable" in result.stderr.lower() or str(closed) in result.stderr, result.stderr
    assert not KEY_RE.search(result.stdout), "a key was printed that no store holds"
    assert time.monotonic() - started < 15


def test_bad_redis_url_scheme(redis_url: str) -> None:
    result = run_cli("keys", "list", "--redis-url", "http://127.0.0.1:1/0", env=clean_env())
    assert result.returncode == 2, f"exit {result.returncode}; stderr: {result.stderr}"
    assert "redis_url" in result.stderr or "--redis-url" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- help, console script -------------------------------------------------------------------


def test_help() -> None:
    result = ok(run_cli("--help", env=clean_env()))
    for command in ("serve", "keys", "mock-upstream"):
        assert command in result.stdout
    keys_help = ok(run_cli("keys", "--help", env=clean_env())).stdout
    for action in ("create", "list", "show", "revoke", "update"):
        assert action in keys_help
    create_help = ok(run_cli("keys", "create", "--help", env=clean_env())).stdout
    for option in ("--name", "--org", "--models", "--rpm", "--tpm", "--max-concurrent", "--expires-in", "--json"):
        assert option in create_help


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "liutong-gateway"
    assert script.exists(), f"console script not installed at {script}"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, encoding="utf-8", env=clean_env(), timeout=20, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert "liutong-gateway" in result.stdout
    for command in ("serve", "keys", "mock-upstream"):
        assert command in result.stdout


# --- long-running commands ------------------------------------------------------------------


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return resp.read()  # type: ignore[no-any-return]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s")


def post_json(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_mock_upstream_command(procs: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "mock-upstream", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(), cwd=REPO,
    )  # fmt: skip
    procs.append(proc)
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    status, body = post_json(f"http://127.0.0.1:{port}/v1/chat/completions", SEED_REQUEST, {})
    assert status == 200
    assert body["usage"]["completion_tokens"] > 0
    proc.terminate()
    assert proc.wait(timeout=10) == 0


def test_serve_demo_mode(procs: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lt-cli-") as tmp:
        out, err = Path(tmp, "out"), Path(tmp, "err")
        with out.open("wb") as out_fh, err.open("wb") as err_fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)],
                stdout=out_fh, stderr=err_fh, env=clean_env(), cwd=tmp,
            )  # fmt: skip
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        deadline = time.monotonic() + 10
        while not (match := KEY_RE.search(err.read_text(errors="replace"))):
            assert time.monotonic() < deadline, f"no demo key on stderr: {err.read_text()}"
            time.sleep(0.05)
        demo_key = match.group(0)
        assert demo_key not in out.read_text(errors="replace"), "the demo key went to stdout/logs too"

        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        status, body = post_json(url, SEED_REQUEST, auth(demo_key))
        assert status == 200, body
        assert body["object"] == "chat.completion"
        assert body["model"] == "crimson-falcon-4"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]

        status, body = post_json(url, SEED_REQUEST, {})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = post_json(url, SEED_REQUEST, auth("lt_" + "x" * 40))
        assert status == 401

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        logs = out.read_text(errors="replace") + err.read_text(errors="replace")
        assert "Traceback" not in logs
        assert "embedded" in logs.lower(), "no warning that the embedded store is in use"
        assert logs.count(demo_key) == 1, "the demo key was printed more than once"
