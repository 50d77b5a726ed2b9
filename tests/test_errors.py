"""The error contract (CONTRACT §1–§2), end to end through a real gateway over HTTP.

Every error the gateway produces itself must be exactly
`{"error": {"message", "type", "param", "code"}}` with the status, type, code and param the
contract's table gives, and every response carries a well-formed `x-request-id`. Where the
contract names no `code` (404 route, 405, 413, 415), the gateway's documented value (`null`,
see `gateway/errors.py`) is pinned, as OpenAI does for the same errors.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import string
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Timeouts
from tests.conftest import SEED_MODELS, auth, chat_body, free_port, gateway_settings

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
USER = {"role": "user", "content": "Hello!"}


# --- helpers --------------------------------------------------------------------------------


async def expect_error(
    resp: aiohttp.ClientResponse, status: int, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """Assert the contract's error shape and values; returns the `error` object."""
    text = await resp.text()
    assert resp.status == status, f"expected {status}, got {resp.status}: {text}"
    assert resp.content_type == "application/json", resp.content_type
    assert_request_id(resp)
    error = assert_error_shape(json.loads(text))
    assert (error["type"], error["code"], error["param"]) == (type_, code, param), error
    return error


def assert_error_shape(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_request_id(resp: aiohttp.ClientResponse) -> str:
    value = resp.headers.get("x-request-id")
    assert value is not None, f"no x-request-id on a {resp.status} response"
    assert REQUEST_ID.fullmatch(value), value
    return value


# --- 400: the request body ------------------------------------------------------------------

NOT_JSON = [
    pytest.param(b"{not json", id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"model": "crimson-falcon-4", "messages": [', id="truncated"),
    pytest.param(b"\xff\xfe\x00{", id="invalid-utf8"),
    pytest.param(b"NaN", id="nan"),
]
NOT_OBJECT = [
    pytest.param(b"[]", id="array"),
    pytest.param(b'[{"model": "crimson-falcon-4"}]', id="array-of-object"),
    pytest.param(b'"crimson-falcon-4"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="bool"),
]


@pytest.mark.parametrize("raw", NOT_JSON + NOT_OBJECT)
async def test_body_not_a_json_object_is_400(gateway, key, http, raw):
    async with http.post(gateway.url + CHAT, data=raw, headers={**JSON, **auth(key)}) as resp:
        await expect_error(resp, 400, "invalid_request_error", None, None)


def _without(field: str) -> dict[str, Any]:
    body = chat_body()
    del body[field]
    return body


BAD_FIELDS = [
    # model
    pytest.param(_without("model"), "model", id="model-missing"),
    pytest.param(chat_body(model=None), "model", id="model-null"),  # type: ignore[arg-type]
    pytest.param(chat_body(model=5), "model", id="model-number"),  # type: ignore[arg-type]
    pytest.param(chat_body(model=["crimson-falcon-4"]), "model", id="model-array"),  # type: ignore[arg-type]
    pytest.param(chat_body(model={"id": "crimson-falcon-4"}), "model", id="model-object"),  # type: ignore[arg-type]
    # messages
    pytest.param(_without("messages"), "messages", id="messages-missing"),
    pytest.param({**chat_body(), "messages": []}, "messages", id="messages-empty"),
    pytest.param({**chat_body(), "messages": None}, "messages", id="messages-null"),
    pytest.param({**chat_body(), "messages": "Hello!"}, "messages", id="messages-string"),
    pytest.param({**chat_body(), "messages": USER}, "messages", id="messages-object"),
    # one message
    pytest.param({**chat_body(), "messages": ["Hello!"]}, "messages[0]", id="message-string"),
    pytest.param({**chat_body(), "messages": [USER, 5]}, "messages[1]", id="message-number"),
    pytest.param({**chat_body(), "messages": [USER, [USER]]}, "messages[1]", id="message-array"),
    pytest.param({**chat_body(), "messages": [USER, {"content": "x"}]}, "messages[1].role", id="role-missing"),
    pytest.param({**chat_body(), "messages": [USER, {"role": "bot", "content": "x"}]}, "messages[1].role",
                 id="role-unknown"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [USER, {"role": "User", "content": "x"}]}, "messages[1].role",
                 id="role-wrong-case"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [USER, {"role": 1, "content": "x"}]}, "messages[1].role",
                 id="role-number"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [USER, USER, {"role": None, "content": "x"}]}, "messages[2].role",
                 id="role-null-third"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [USER, {"role": ["user"], "content": "x"}]}, "messages[1].role",
                 id="role-array"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [USER, {"role": {"name": "user"}, "content": "x"}]},
                 "messages[1].role", id="role-object"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [{"role": "user"}]}, "messages[0].content", id="content-missing"),
    pytest.param({**chat_body(), "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
                 id="content-number"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [{"role": "user", "content": None}]}, "messages[0].content",
                 id="content-null"),  # fmt: skip
    pytest.param({**chat_body(), "messages": [USER, {"role": "assistant", "content": ["a"]}]},
                 "messages[1].content", id="content-array"),  # fmt: skip
    # sampling parameters
    pytest.param(chat_body(temperature=-0.1), "temperature", id="temperature--0.1"),
    pytest.param(chat_body(temperature=2.1), "temperature", id="temperature-2.1"),
    pytest.param(chat_body(temperature=3), "temperature", id="temperature-3"),
    pytest.param(chat_body(temperature="hot"), "temperature", id="temperature-string"),
    pytest.param(chat_body(temperature="1"), "temperature", id="temperature-numeric-string"),
    pytest.param(chat_body(temperature=True), "temperature", id="temperature-bool"),
    pytest.param(chat_body(top_p=1.5), "top_p", id="top_p-1.5"),
    pytest.param(chat_body(top_p=-0.01), "top_p", id="top_p-negative"),
    pytest.param(chat_body(top_p="0.5"), "top_p", id="top_p-string"),
    pytest.param(chat_body(max_tokens=0), "max_tokens", id="max_tokens-0"),
    pytest.param(chat_body(max_tokens=-1), "max_tokens", id="max_tokens--1"),
    pytest.param(chat_body(max_tokens=1.5), "max_tokens", id="max_tokens-1.5"),
    pytest.param(chat_body(max_tokens="10"), "max_tokens", id="max_tokens-string"),
    pytest.param(chat_body(max_tokens=True), "max_tokens", id="max_tokens-true"),
    pytest.param(chat_body(n=0), "n", id="n-0"),
    pytest.param(chat_body(n=-2), "n", id="n-negative"),
    pytest.param(chat_body(n=1.5), "n", id="n-fraction"),
    pytest.param(chat_body(n="2"), "n", id="n-string"),
    pytest.param(chat_body(n=True), "n", id="n-true"),
    pytest.param(chat_body(stream="yes"), "stream", id="stream-yes"),
    pytest.param(chat_body(stream="true"), "stream", id="stream-string-true"),
    pytest.param(chat_body(stream=1), "stream", id="stream-1"),
    pytest.param(chat_body(stop=5), "stop", id="stop-number"),
    pytest.param(chat_body(stop=[1]), "stop", id="stop-array-of-number"),
    pytest.param(chat_body(stop=["a", None]), "stop", id="stop-array-with-null"),
    pytest.param(chat_body(stop={"a": "b"}), "stop", id="stop-object"),
]


@pytest.mark.parametrize(("body", "param"), BAD_FIELDS)
async def test_bad_field_is_400_naming_its_path(gateway, key, http, body, param):
    async with http.post(gateway.url + CHAT, json=body, headers=auth(key)) as resp:
        error = await expect_error(resp, 400, "invalid_request_error", None, param)
    assert key not in error["message"]
    stats = await gateway.mock_stats()
    assert not stats.get("records"), "a rejected request reached the upstream"


VALID_BOUNDARIES = [
    pytest.param({"temperature": 0}, id="temperature-0"),
    pytest.param({"temperature": 2}, id="temperature-2"),
    pytest.param({"temperature": 2.0}, id="temperature-2.0"),
    pytest.param({"temperature": 0.7}, id="temperature-0.7"),
    pytest.param({"top_p": 0}, id="top_p-0"),
    pytest.param({"top_p": 1}, id="top_p-1"),
    pytest.param({"top_p": 1.0}, id="top_p-1.0"),
    pytest.param({"max_tokens": 1}, id="max_tokens-1"),
    pytest.param({"n": 1}, id="n-1"),
    pytest.param({"n": 2}, id="n-2"),
    pytest.param({"stream": False}, id="stream-false"),
    pytest.param({"stop": "x"}, id="stop-string"),
    pytest.param({"stop": ["a", "b"]}, id="stop-array"),
    pytest.param({"messages": [{"role": "system", "content": ""}, {"role": "assistant", "content": "a"}, USER]},
                 id="all-roles-empty-content"),  # fmt: skip
    pytest.param({"user": "u-1", "presence_penalty": 0.5, "seed": 7}, id="unconstrained-fields"),
]


@pytest.mark.parametrize("extra", VALID_BOUNDARIES)
async def test_valid_boundary_values_pass(gateway, key, http, extra):
    async with http.post(gateway.url + CHAT, json={**chat_body(), **extra}, headers=auth(key)) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        assert_request_id(resp)
    body = json.loads(text)
    assert body["object"] == "chat.completion"


async def test_valid_stream_true_passes(gateway, key, http):
    async with http.post(gateway.url + CHAT, json=chat_body(stream=True), headers=auth(key)) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert_request_id(resp)
        text = await resp.text()
    assert text.rstrip().endswith("data: [DONE]")


# --- 401 ------------------------------------------------------------------------------------

_ALNUM = string.ascii_letters + string.digits


def _well_formed_unknown() -> str:
    return "lt_" + "".join(_ALNUM[(i * 7) % len(_ALNUM)] for i in range(40))


BAD_AUTH = [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("Basic dXNlcjpwYXNzd29yZA==", id="basic"),
    pytest.param("Bearer", id="bearer-without-token"),
    pytest.param("Bearer ", id="bearer-empty-token"),
    pytest.param("Bearer sk-" + "a1B2" * 10, id="no-lt-prefix"),
    pytest.param("Bearer lt_" + "a" * 31, id="lt-too-short"),
    pytest.param("Bearer lt_" + "a" * 39 + "!", id="lt-bad-character"),
    pytest.param("Bearer " + _well_formed_unknown(), id="unknown-well-formed"),
    pytest.param("Token " + _well_formed_unknown(), id="other-scheme"),
    pytest.param(_well_formed_unknown(), id="no-scheme"),
]


@pytest.mark.parametrize("header", BAD_AUTH)
async def test_bad_authorization_is_401(gateway, http, header):
    headers = {} if header is None else {"Authorization": header}
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=headers) as resp:
        error = await expect_error(resp, 401, "invalid_request_error", "invalid_api_key", None)
        raw = await resp.text()
    if header:
        token = header.split(" ", 1)[-1].strip()
        if len(token) > 8:
            assert token not in raw, "a 401 body echoes the key"
            assert token not in error["message"]


@pytest.mark.parametrize("header", [p for p in BAD_AUTH if p.id in ("missing", "basic", "unknown-well-formed")])
async def test_models_list_needs_auth(gateway, http, header):
    headers = {} if header is None else {"Authorization": header}
    async with http.get(gateway.url + "/v1/models", headers=headers) as resp:
        await expect_error(resp, 401, "invalid_request_error", "invalid_api_key", None)


async def _assert_key_rejected(gateway, http, plaintext: str) -> None:
    for method, path, payload in (("POST", CHAT, chat_body()), ("GET", "/v1/models", None)):
        async with http.request(method, gateway.url + path, json=payload, headers=auth(plaintext)) as resp:
            await expect_error(resp, 401, "invalid_request_error", "invalid_api_key", None)
            raw = await resp.text()
        assert plaintext not in raw and plaintext[3:] not in raw, "a 401 body echoes the key"


async def test_revoked_key_is_401(gateway, http):
    plaintext, record = await gateway.create_key("to-revoke")
    await gateway.state.keys.revoke(record.key_id)
    await _assert_key_rejected(gateway, http, plaintext)


async def test_disabled_key_is_401(gateway, http):
    plaintext, record = await gateway.create_key("to-disable")
    await gateway.state.keys.update(record.key_id, disabled=True)
    await _assert_key_rejected(gateway, http, plaintext)


async def test_key_expired_in_the_store_is_401(gateway, http):
    plaintext, record = await gateway.create_key("expired")
    await gateway.state.keys.update(record.key_id, expires_at=time.time() - 1)
    await _assert_key_rejected(gateway, http, plaintext)


async def test_key_that_expires_while_cached_turns_401(gateway, http):
    plaintext, _ = await gateway.create_key("short-lived", expires_in=0.4)
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(plaintext)) as resp:
        assert resp.status == 200, await resp.text()
    await asyncio.sleep(0.5)  # well within the key cache's TTL: the cached record must expire too
    await _assert_key_rejected(gateway, http, plaintext)


async def test_lowercase_bearer_scheme_is_accepted(gateway, key, http):
    # RFC 9110 §11.1: the auth scheme is case-insensitive.
    async with http.post(gateway.url + CHAT, json=chat_body(), headers={"Authorization": f"bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()


# --- 404 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["no-such-model", "CRIMSON-FALCON-4", "crimson-falcon-4 ", "x" * 300])
async def test_unknown_model_is_404(gateway, key, http, model):
    async with http.post(gateway.url + CHAT, json=chat_body(model), headers=auth(key)) as resp:
        await expect_error(resp, 404, "invalid_request_error", "model_not_found", None)


async def test_model_the_key_may_not_use_is_404(gateway, http):
    plaintext, _ = await gateway.create_key("owl-only", models=("indigo-owl-4",))
    for model in ("crimson-falcon-4", "amber-phoenix-4"):
        async with http.post(gateway.url + CHAT, json=chat_body(model), headers=auth(plaintext)) as resp:
            await expect_error(resp, 404, "invalid_request_error", "model_not_found", None)
    async with http.post(gateway.url + CHAT, json=chat_body("indigo-owl-4"), headers=auth(plaintext)) as resp:
        assert resp.status == 200, await resp.text()
    stats = await gateway.mock_stats()
    assert [r["model"] for r in stats["records"]] == ["indigo-owl-4"]


def _assert_model_list(body: Any) -> list[str]:
    assert body["object"] == "list"
    assert isinstance(body["data"], list)
    for entry in body["data"]:
        assert entry["object"] == "model" and isinstance(entry["id"], str)
    return [entry["id"] for entry in body["data"]]


async def test_models_list_shows_only_the_keys_models(gateway, key, http):
    restricted, _ = await gateway.create_key("owl-only", models=("indigo-owl-4",))
    async with http.get(gateway.url + "/v1/models", headers=auth(restricted)) as resp:
        assert resp.status == 200
        assert_request_id(resp)
        assert _assert_model_list(await resp.json()) == ["indigo-owl-4"]
    async with http.get(gateway.url + "/v1/models", headers=auth(key)) as resp:
        assert resp.status == 200
        assert sorted(_assert_model_list(await resp.json())) == sorted(SEED_MODELS)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("POST", "/v1/chat"), ("GET", "/"),
                                              ("POST", "/v1/chat/completions/extra")])  # fmt: skip
async def test_unknown_route_is_404_json(gateway, key, http, method, path):
    async with http.request(method, gateway.url + path, json=chat_body(), headers=auth(key)) as resp:
        await expect_error(resp, 404, "invalid_request_error", None, None)


# --- 405, 413, 415 --------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", CHAT), ("PUT", CHAT), ("DELETE", CHAT),
                                              ("POST", "/v1/models")])  # fmt: skip
async def test_wrong_method_is_405(gateway, key, http, method, path):
    async with http.request(method, gateway.url + path, headers=auth(key)) as resp:
        await expect_error(resp, 405, "invalid_request_error", None, None)
        allowed = {m.strip() for m in resp.headers.get("Allow", "").split(",")}
    assert ("POST" if path == CHAT else "GET") in allowed


def _padded_body(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes."""
    base = json.dumps(chat_body(), separators=(",", ":")).encode()
    pad = size - len(base)
    assert pad >= 0
    body = chat_body()
    body["messages"][0]["content"] += "x" * pad
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


async def _chunks(raw: bytes, size: int = 256) -> AsyncIterator[bytes]:
    for start in range(0, len(raw), size):
        yield raw[start : start + size]


async def test_body_over_the_limit_is_413(make_gateway, http):
    gw = await make_gateway(max_body_bytes=1024)
    key, _ = await gw.create_key()
    url = gw.url + CHAT
    # With Content-Length.
    async with http.post(url, data=_padded_body(1025), headers={**JSON, **auth(key)}) as resp:
        await expect_error(resp, 413, "invalid_request_error", None, None)
    async with http.post(url, data=_padded_body(4000), headers={**JSON, **auth(key)}) as resp:
        await expect_error(resp, 413, "invalid_request_error", None, None)
    # Chunked: no Content-Length, the limit must hold while reading.
    async with http.post(url, data=_chunks(_padded_body(3000)), headers={**JSON, **auth(key)}) as resp:
        assert "Content-Length" not in resp.request_info.headers
        await expect_error(resp, 413, "invalid_request_error", None, None)
    stats = await gw.mock_stats()
    assert not stats.get("records"), "an oversized body reached the upstream"


async def test_body_at_the_limit_passes(make_gateway, http):
    gw = await make_gateway(max_body_bytes=1024)
    key, _ = await gw.create_key()
    async with http.post(gw.url + CHAT, data=_padded_body(1024), headers={**JSON, **auth(key)}) as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(gw.url + CHAT, data=_chunks(_padded_body(1024)), headers={**JSON, **auth(key)}) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded", "application/octet-stream",
     "multipart/form-data; boundary=x", "text/json"],
)  # fmt: skip
async def test_non_json_content_type_is_415(gateway, key, http, content_type):
    raw = json.dumps(chat_body()).encode()
    async with http.post(gateway.url + CHAT, data=raw, headers={**auth(key), "Content-Type": content_type}) as resp:
        await expect_error(resp, 415, "invalid_request_error", None, None)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
async def test_json_content_type_variants_pass(gateway, key, http, content_type):
    raw = json.dumps(chat_body()).encode()
    async with http.post(gateway.url + CHAT, data=raw, headers={**auth(key), "Content-Type": content_type}) as resp:
        assert resp.status == 200, await resp.text()


# --- compressed request bodies (aiohttp decodes gzip/deflate itself) --------------------------


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        pytest.param("gzip", b"this is not gzip", id="gzip-garbage"),
        pytest.param("deflate", b"this is not deflate", id="deflate-garbage"),
        pytest.param("gzip", gzip.compress(b"{not json"), id="gzip-of-garbage-json"),
    ],
)
async def test_undecodable_body_is_400_not_500(gateway, key, http, encoding, data):
    headers = {**JSON, **auth(key), "Content-Encoding": encoding}
    async with http.post(gateway.url + CHAT, data=data, headers=headers) as resp:
        await expect_error(resp, 400, "invalid_request_error", None, None)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_valid_body_is_served_or_refused_cleanly(gateway, key, http, encoding):
    raw = json.dumps(chat_body()).encode()
    data = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    headers = {**JSON, **auth(key), "Content-Encoding": encoding}
    async with http.post(gateway.url + CHAT, data=data, headers=headers) as resp:
        assert resp.status in (200, 415), f"{resp.status}: {await resp.text()}"
        if resp.status == 415:  # refusing the encoding is acceptable; failing on it is not
            await expect_error(resp, 415, "invalid_request_error", None, None)
            return
        assert (await resp.json())["object"] == "chat.completion"


# --- upstream failures ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_refusing_connections_is_502(make_gateway, redis_url, http, stream):
    closed = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway(settings=gateway_settings(closed, redis_url))
    key, _ = await gw.create_key()
    async with http.post(gw.url + CHAT, json=chat_body(stream=stream), headers=auth(key)) as resp:
        await expect_error(resp, 502, "upstream_error", "upstream_unavailable", None)


async def test_upstream_too_slow_is_504(make_gateway, http):
    gw = await make_gateway(timeouts=Timeouts(connect=1, first_byte=0.5, idle=0.5, total=1))
    key, _ = await gw.create_key()
    started = time.monotonic()
    headers = {**auth(key), "x-mock-delay-ms": "3000"}
    async with http.post(gw.url + CHAT, json=chat_body(), headers=headers) as resp:
        await expect_error(resp, 504, "upstream_error", "upstream_timeout", None)
    assert time.monotonic() - started < 2.5, "the gateway waited past its own timeout"


@pytest.mark.parametrize("status", [500, 429, 503, 400])
async def test_upstream_errors_pass_through_unchanged(gateway, key, http, status):
    headers = {"x-mock-status": str(status)}
    async with http.post(gateway.upstream + CHAT, json=chat_body(), headers=headers) as resp:
        expected = await resp.read()
        assert resp.status == status
    async with http.post(gateway.url + CHAT, json=chat_body(), headers={**auth(key), **headers}) as resp:
        assert resp.status == status
        assert await resp.read() == expected
        assert_request_id(resp)


# --- x-request-id ---------------------------------------------------------------------------

# (method, path, json body, needs key, expected status)
ROUTES = [
    pytest.param("POST", CHAT, chat_body(), True, 200, id="chat-200"),
    pytest.param("POST", CHAT, chat_body(temperature=9), True, 400, id="chat-400"),
    pytest.param("POST", CHAT, chat_body(), False, 401, id="chat-401"),
    pytest.param("POST", CHAT, chat_body("no-such-model"), True, 404, id="chat-404-model"),
    pytest.param("GET", "/v1/nowhere", None, True, 404, id="route-404"),
    pytest.param("GET", CHAT, None, True, 405, id="chat-405"),
    pytest.param("GET", "/v1/models", None, True, 200, id="models-200"),
    pytest.param("GET", "/healthz", None, False, 200, id="healthz"),
]


@pytest.mark.parametrize(("method", "path", "body", "with_key", "status"), ROUTES)
@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param(None, False, id="none"),
        pytest.param("abc-123.X:y_z", True, id="valid"),
        pytest.param("a" * 128, True, id="128-chars"),
        pytest.param("x", True, id="1-char"),
        pytest.param("has space", False, id="space"),
        pytest.param("b" * 129, False, id="129-chars"),
        pytest.param("", False, id="empty"),
        pytest.param("a/b", False, id="slash"),
        pytest.param("id;drop", False, id="semicolon"),
    ],
)
async def test_every_response_carries_a_request_id(
    gateway, key, http, method, path, body, with_key, status, sent, kept
):
    headers = auth(key) if with_key else {}
    if sent is not None:
        headers["x-request-id"] = sent
    async with http.request(method, gateway.url + path, json=body, headers=headers) as resp:
        assert resp.status == status, await resp.text()
        got = assert_request_id(resp)
        assert len(resp.headers.getall("x-request-id")) == 1
    if kept:
        assert got == sent
    else:
        assert got != sent


async def test_generated_request_ids_are_unique(gateway, key, http):
    seen = set()
    for _ in range(20):
        async with http.post(gateway.url + CHAT, json=chat_body(), headers=auth(key)) as resp:
            seen.add(assert_request_id(resp))
    assert len(seen) == 20


async def test_request_id_reaches_the_upstream_and_comes_back(gateway, key, http):
    headers = {**auth(key), "x-request-id": "trace-42"}
    async with http.post(gateway.url + CHAT, json=chat_body(), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "trace-42"
    stats = await gateway.mock_stats()
    assert [r["request_id"] for r in stats["records"]] == ["trace-42"]


async def test_error_responses_with_upstream_failure_carry_request_id(make_gateway, redis_url, http):
    gw = await make_gateway(settings=gateway_settings(f"http://127.0.0.1:{free_port()}", redis_url))
    key, _ = await gw.create_key()
    headers = {**auth(key), "x-request-id": "keep:me"}
    async with http.post(gw.url + CHAT, json=chat_body(), headers=headers) as resp:
        assert resp.status == 502
        assert resp.headers["x-request-id"] == "keep:me"


# --- never a 500 for bad input (property-based) ---------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=3),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), _json_values)
_message = st.one_of(
    st.fixed_dictionaries({}, optional={"role": _roles, "content": st.one_of(st.text(max_size=40), _json_values)}),
    _json_values,
)
_small_int = st.one_of(st.integers(min_value=-2, max_value=4), _json_values)
_chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from([*SEED_MODELS, "no-such-model", ""]), _json_values),
        "messages": st.one_of(st.lists(_message, max_size=4), _json_values),
        "temperature": st.one_of(st.floats(min_value=-1, max_value=3), _json_values),
        "top_p": st.one_of(st.floats(min_value=-1, max_value=2), _json_values),
        "max_tokens": _small_int,
        "n": _small_int,
        "stream": st.one_of(st.booleans(), _json_values),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3), _json_values),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": _json_values}), _json_values),
    },
)
_PERTURBABLE = ("temperature", "top_p", "max_tokens", "n", "stream", "stop", "stream_options", "messages", "model",
                "messages[0]", "messages[1].role", "messages[1].content")  # fmt: skip


def _perturbed(field: str, value: Any) -> bytes:
    body = chat_body()
    body["messages"] = [{"role": "system", "content": "Be brief."}, dict(USER)]
    if field == "messages[0]":
        body["messages"][0] = value
    elif field.startswith("messages[1]."):
        body["messages"][1][field.rsplit(".", 1)[1]] = value
    else:
        body[field] = value
    return json.dumps(body).encode()


_valid_chat = st.fixed_dictionaries(
    {
        "model": st.sampled_from([*SEED_MODELS, "no-such-model"]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=60)}
            ),
            min_size=1, max_size=3,
        ),
    },
    optional={
        "temperature": st.floats(min_value=0, max_value=2),
        "top_p": st.floats(min_value=0, max_value=1),
        "max_tokens": st.one_of(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=2**63 - 1)),
        "n": st.integers(min_value=1, max_value=200),
        "stream": st.booleans(),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3)),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "user": _json_values,
    },
)  # fmt: skip
_payloads = st.one_of(
    st.binary(max_size=300),
    _valid_chat.map(lambda v: json.dumps(v).encode()),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _chat_like.map(lambda v: json.dumps(v).encode()),
    # Near-valid bodies (the seed shape with one field perturbed) reach deeper into validation.
    st.tuples(st.sampled_from(_PERTURBABLE), _json_values).map(lambda kv: _perturbed(*kv)),
)
ALLOWED = {200, 400, 404, 413, 415, 429}
FUZZ = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


async def test_bad_input_never_yields_a_500(gateway, key, http):
    """Hypothesis runs in a worker thread; each example is posted on the test's own loop."""
    loop = asyncio.get_running_loop()
    seen: set[int] = set()

    async def post(raw: bytes) -> tuple[int, str, bytes, str | None]:
        async with http.post(gateway.url + CHAT, data=raw, headers={**JSON, **auth(key)}) as resp:
            return resp.status, resp.content_type, await resp.read(), resp.headers.get("x-request-id")

    @FUZZ
    @given(_payloads)
    def check(raw: bytes) -> None:
        status, content_type, body, request_id = asyncio.run_coroutine_threadsafe(post(raw), loop).result(timeout=15)
        seen.add(status)
        assert status in ALLOWED, f"{status} for {raw[:200]!r}: {body[:300]!r}"
        assert request_id is not None and REQUEST_ID.fullmatch(request_id)
        if status >= 400:
            assert content_type == "application/json", (status, content_type, raw[:200])
            assert_error_shape(json.loads(body))

    await asyncio.to_thread(check)
    assert {200, 400} <= seen, seen


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/json", "application/x-ndjson", "application/problem+json"]
)
async def test_arbitrary_bytes_with_any_content_type_never_500(gateway, key, http, content_type):
    loop = asyncio.get_running_loop()

    async def post(raw: bytes) -> tuple[int, bytes]:
        headers = auth(key)
        if content_type is not None:
            headers["Content-Type"] = content_type
        async with http.post(gateway.url + CHAT, data=raw, headers=headers) as resp:
            return resp.status, await resp.read()

    @settings(max_examples=30, deadline=None, database=None)
    @given(st.binary(max_size=200))
    def check(raw: bytes) -> None:
        status, body = asyncio.run_coroutine_threadsafe(post(raw), loop).result(timeout=15)
        assert status in {400, 415}, (status, raw, body)
        assert_error_shape(json.loads(body))

    await asyncio.to_thread(check)
