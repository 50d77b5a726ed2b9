"""Request heads on a real listener: the deadline for slow heads, and JSON for unparsable ones.

One `serve` subprocess (with a 1 s `request_header_timeout`, small header limits and an admin
listener) and the mock upstream as a subprocess serve the whole module; every test talks raw
HTTP/1.1 over its own asyncio sockets, so that it controls each byte and when it is sent.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from tests.conftest import (
    REPO,
    GatewayProcess,
    RedisServer,
    auth,
    chat_body,
    create_key_in,
    free_port,
    write_gateway_config,
)

pytestmark = pytest.mark.integration

HEAD_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 5.0
MAX_HEADER_BYTES = 1024
MAX_HEADERS = 20
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


@dataclass
class Listener:
    gateway: GatewayProcess
    port: int
    admin_port: int
    redis_url: str


@pytest.fixture(scope="module")
def listener(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    tmp = tmp_path_factory.mktemp("slow-headers")
    upstream_port, admin_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "gateway", "mock-upstream", "--host", "127.0.0.1", "--port", str(upstream_port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    config = write_gateway_config(
        tmp / "gw.yaml", redis_server.url, f"http://127.0.0.1:{upstream_port}",
        request_header_timeout=HEAD_TIMEOUT, keepalive_timeout=KEEPALIVE_TIMEOUT,
        max_header_bytes=MAX_HEADER_BYTES, max_headers=MAX_HEADERS,
        admin_listen={"host": "127.0.0.1", "port": admin_port}, usage_spool_path=str(tmp / "usage.spool"),
    )  # fmt: skip
    gateway = GatewayProcess(config)
    try:
        gateway.start()
        yield Listener(gateway, gateway.port, admin_port, redis_server.url)
    finally:
        gateway.stop()
        upstream.terminate()
        upstream.wait(timeout=10)


# --- raw HTTP/1.1 ----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, object]:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        payload = orjson.loads(self.body)
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
        return payload["error"]  # type: ignore[no-any-return]


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> Answer:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def assert_closed(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(2):
        assert await reader.read() == b""


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def trickle(writer: asyncio.StreamWriter, data: bytes, interval: float) -> None:
    """Send `data` one byte per `interval` (until the peer closes)."""
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(interval)


async def expect_head_timeout(reader: asyncio.StreamReader, started: float) -> None:
    """A 408 `request_timeout` in the contract's JSON, `HEAD_TIMEOUT` after `started`, then EOF."""
    answer = await read_answer(reader, timeout=HEAD_TIMEOUT + 3)
    elapsed = time.monotonic() - started
    assert answer.status == 408, answer
    assert answer.headers.get("connection", "").lower() == "close"
    error = answer.error()
    assert error["type"] == "invalid_request_error" and error["code"] == "request_timeout", error
    assert HEAD_TIMEOUT - 0.1 <= elapsed <= HEAD_TIMEOUT + 1.0, elapsed
    await assert_closed(reader)


# --- the deadline ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    [b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n", b"GET /heal"],
    ids=["headers", "request-line"],
)
async def test_a_head_sent_one_byte_at_a_time_gets_408_json_and_is_closed(listener: Listener, prefix: bytes) -> None:
    reader, writer = await connect(listener.port)
    started = time.monotonic()
    writer.write(prefix)
    sender = asyncio.create_task(trickle(writer, b"a" * 100, 0.1))  # a header name or the target; 10 s
    try:
        await expect_head_timeout(reader, started)
    finally:
        sender.cancel()
        writer.close()


async def test_a_connection_that_sends_nothing_gets_408_after_the_deadline(listener: Listener) -> None:
    reader, writer = await connect(listener.port)
    started = time.monotonic()
    try:
        await expect_head_timeout(reader, started)
    finally:
        writer.close()


async def test_an_idle_keepalive_connection_outlives_the_deadline_but_a_slow_next_head_does_not(
    listener: Listener,
) -> None:
    reader, writer = await connect(listener.port)
    try:
        writer.write(HEALTHZ)
        assert (await read_answer(reader)).status == 200
        await asyncio.sleep(HEAD_TIMEOUT * 1.5)  # idle: governed by keepalive_timeout (5 s), not the deadline
        writer.write(HEALTHZ)
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.headers.get("connection", "").lower() != "close"

        await asyncio.sleep(HEAD_TIMEOUT * 0.8)
        # The deadline of the next request starts at its first byte, not at the last answer.
        started = time.monotonic()
        sender = asyncio.create_task(trickle(writer, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n", 0.1))
        try:
            await expect_head_timeout(reader, started)
        finally:
            sender.cancel()
    finally:
        writer.close()


async def test_a_head_in_quick_pieces_and_a_body_slower_than_the_deadline_are_served(listener: Listener) -> None:
    key = await create_key_in(listener.redis_url, "slow-headers")
    body = orjson.dumps(chat_body())
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Authorization: {auth(key)['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    reader, writer = await connect(listener.port)
    try:
        for _ in range(2):  # the second request on the same keep-alive connection
            pieces = [head[i : i + 40] for i in range(0, len(head), 40)]
            for piece in pieces:  # the whole head within about half the deadline
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(HEAD_TIMEOUT / 2 / len(pieces))
            for piece in (body[: len(body) // 2], body[len(body) // 2 :]):  # the body: 1.5 × the deadline
                await asyncio.sleep(HEAD_TIMEOUT * 0.75)
                writer.write(piece)
            answer = await read_answer(reader)
            assert answer.status == 200, answer
            assert orjson.loads(answer.body)["object"] == "chat.completion"
    finally:
        writer.close()


async def test_pipelined_requests_are_all_answered(listener: Listener) -> None:
    reader, writer = await connect(listener.port)
    try:
        writer.write(HEALTHZ * 3 + b"GET /readyz HTTP/1.1\r\nHost: gw\r\n")  # the last head still incomplete
        for _ in range(3):
            assert (await read_answer(reader)).status == 200
        writer.write(b"\r\n")
        assert (await read_answer(reader)).status in (200, 503)
        await asyncio.sleep(HEAD_TIMEOUT * 1.5)
        writer.write(HEALTHZ)
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()


async def test_the_admin_listener_has_the_deadline_too(listener: Listener) -> None:
    reader, writer = await connect(listener.admin_port)
    started = time.monotonic()
    writer.write(b"GET /metrics HTTP/1.1\r\n")
    try:
        await expect_head_timeout(reader, started)
    finally:
        writer.close()


# --- heads that do not parse -----------------------------------------------------------------

_LONG = b"a" * (MAX_HEADER_BYTES + 100)


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Long: " + _LONG + b"\r\n\r\n", 431, "request_header_fields_too_large"),
        (b"GET /" + _LONG + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 431, "request_header_fields_too_large"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 5))
            + b"\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
        (b"G@T /healthz HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "malformed_request"),
        (b"GET /healthz HTTP/9.1\r\nHost: gw\r\n\r\n", 400, "malformed_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Nul: a\x00b\r\n\r\n", 400, "malformed_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nBad Name: v\r\n\r\n", 400, "malformed_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "malformed_request"),
    ],
    ids=["long-header", "long-target", "too-many-headers", "garbage", "bad-method", "bad-version", "nul-byte",
         "bad-header-name", "two-content-lengths"],  # fmt: skip
)
async def test_an_unparsable_head_gets_the_contract_json_and_close(
    listener: Listener, head: bytes, status: int, code: str
) -> None:
    reader, writer = await connect(listener.port)
    try:
        writer.write(HEALTHZ)  # a good request first: the error comes on a used keep-alive connection
        assert (await read_answer(reader)).status == 200
        writer.write(head)
        answer = await read_answer(reader)
        assert answer.status == status, answer
        assert answer.headers.get("connection", "").lower() == "close"
        error = answer.error()
        assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] is None, error
        assert isinstance(error["message"], str) and error["message"]
        await assert_closed(reader)
    finally:
        writer.close()


def test_config_validates_the_head_settings() -> None:
    from gateway.config import ConfigError, load_settings

    settings = load_settings(env={"LIUTONG_REQUEST_HEADER_TIMEOUT": "2.5", "LIUTONG_MAX_HEADER_BYTES": "4096",
                                  "LIUTONG_MAX_HEADERS": "64"})  # fmt: skip
    assert (settings.request_header_timeout, settings.max_header_bytes, settings.max_headers) == (2.5, 4096, 64)
    defaults = load_settings(env={})
    assert (defaults.request_header_timeout, defaults.max_header_bytes, defaults.max_headers) == (10.0, 8190, 128)
    for name, value in (("REQUEST_HEADER_TIMEOUT", "0"), ("REQUEST_HEADER_TIMEOUT", "soon"), ("MAX_HEADERS", "2"),
                        ("MAX_HEADER_BYTES", "1.5")):  # fmt: skip
        with pytest.raises(ConfigError, match=name.lower()):
            load_settings(env={f"LIUTONG_{name}": value})


async def test_rejected_heads_are_logged_in_one_line_without_a_traceback(listener: Listener) -> None:
    def logged() -> list[dict[str, object]]:
        lines = listener.gateway.logs().splitlines()
        return [orjson.loads(line) for line in lines if '"request_head_rejected"' in line]

    before = len(logged())
    reader, writer = await connect(listener.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Nul: a\x00b\r\n\r\n")
    assert (await read_answer(reader)).status == 400
    writer.close()
    deadline = time.monotonic() + 5
    while len(logged()) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    line = logged()[-1]
    assert (line["status"], line["code"], line["level"]) == (400, "malformed_request", "info"), line
    assert "Traceback" not in listener.gateway.stderr() + listener.gateway.logs()
