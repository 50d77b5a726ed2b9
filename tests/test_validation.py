"""Unit tests of `gateway.api.validation`: what a Chat Completions body must look like (CONTRACT §2),
the prompt token estimate that tpm reserves, and the bytes that go upstream (CONTRACT §1:
unchanged, except `stream_options.include_usage` added to a stream that did not ask for it).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.validation import ChatRequest, estimate_prompt_tokens, parse_chat_request, upstream_body
from gateway.errors import BadRequest
from gateway.mock import server as mock_upstream

USER = {"role": "user", "content": "Hello!"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "crimson-falcon-4", "messages": [dict(USER)], **fields}


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


def rejected(payload: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_chat_request(payload)
    error = info.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    assert error.message.strip()
    return error


# --- accepted -------------------------------------------------------------------------------


def test_minimal_request_is_parsed_with_defaults():
    chat = parse_chat_request(raw(body()))
    assert isinstance(chat, ChatRequest)
    assert chat.model == "crimson-falcon-4"
    assert chat.body == body()
    assert (chat.stream, chat.n, chat.max_tokens, chat.wants_usage) == (False, 1, None, False)
    assert chat.prompt_estimate == estimate_prompt_tokens([USER])


def test_full_request_is_parsed():
    payload = body(
        messages=[{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Hi."}],
        temperature=0.7, top_p=0.9, max_tokens=512, n=3, stream=True, stop=["\n", "END"],
        stream_options={"include_usage": True},
    )  # fmt: skip
    chat = parse_chat_request(raw(payload))
    assert chat.body == payload
    assert (chat.stream, chat.n, chat.max_tokens, chat.wants_usage) == (True, 3, 512, True)
    assert chat.prompt_estimate == estimate_prompt_tokens(payload["messages"])


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"temperature": 0}, id="temperature-0"),
        pytest.param({"temperature": 2}, id="temperature-2"),
        pytest.param({"temperature": 2.0}, id="temperature-2.0"),
        pytest.param({"top_p": 0}, id="top_p-0"),
        pytest.param({"top_p": 1}, id="top_p-1"),
        pytest.param({"top_p": 0.0}, id="top_p-0.0"),
        pytest.param({"max_tokens": 1}, id="max_tokens-1"),
        pytest.param({"max_tokens": 2**40}, id="max_tokens-big"),
        pytest.param({"n": 1}, id="n-1"),
        pytest.param({"stream": False}, id="stream-false"),
        pytest.param({"stop": "x"}, id="stop-string"),
        pytest.param({"stop": ""}, id="stop-empty-string"),
        pytest.param({"stop": ["a", "b"]}, id="stop-array"),
        pytest.param({"stop": []}, id="stop-empty-array"),
        # null means "the default", as OpenAI's API treats it
        pytest.param({"temperature": None, "top_p": None, "max_tokens": None, "n": None, "stream": None,
                      "stop": None, "stream_options": None}, id="nulls"),  # fmt: skip
        # fields the contract does not constrain pass through untouched
        pytest.param({"tools": [{"type": "function"}], "user": 5, "logit_bias": {"1": -100}}, id="unconstrained"),
        pytest.param({"messages": [{"role": "user", "content": "", "name": "x"}]}, id="empty-content-extra-key"),
    ],
)
def test_accepts(fields):
    chat = parse_chat_request(raw(body(**fields)))
    assert chat.body == body(**fields)


def test_null_n_and_stream_take_their_defaults():
    chat = parse_chat_request(raw(body(n=None, stream=None)))
    assert (chat.n, chat.stream) == (1, False)


@pytest.mark.parametrize(
    ("options", "wants"),
    [
        ({"include_usage": True}, True),
        ({"include_usage": False}, False),
        ({"include_usage": "true"}, False),
        ({"include_usage": 1}, False),
        ({}, False),
        (None, False),
    ],
)
def test_wants_usage_only_when_the_client_asked_for_it(options, wants):
    assert parse_chat_request(raw(body(stream=True, stream_options=options))).wants_usage is wants


def test_utf8_content_and_unicode_escapes():
    payload = '{"model":"crimson-falcon-4","messages":[{"role":"user","content":"caf\\u00e9 \u4f60\u597d \U0001f600"}]}'
    chat = parse_chat_request(payload.encode())
    assert chat.body["messages"][0]["content"] == "café 你好 😀"


# --- rejected -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b" ", b"{", b"{not json}", b"\xff\xfe", b"{'model': 1}", b"NaN", b"[1e400]", b'"\\ud800"',
     b'{"model": "crimson-falcon-4", "messages": [}'],
)  # fmt: skip
def test_not_json_is_rejected_without_param(payload):
    assert rejected(payload).param is None


@pytest.mark.parametrize("payload", [b"[]", b"[{}]", b'"text"', b"42", b"4.2", b"null", b"true", b"false"])
def test_not_an_object_is_rejected_without_param(payload):
    assert rejected(payload).param is None


def _without(name: str) -> dict[str, Any]:
    payload = body()
    del payload[name]
    return payload


ROLE_OK = {"role": "assistant", "content": "ok"}

REJECTED = [
    (_without("model"), "model"),
    (body(model=None), "model"),
    (body(model=7), "model"),
    (body(model=True), "model"),
    (body(model=["crimson-falcon-4"]), "model"),
    (body(model={}), "model"),
    (_without("messages"), "messages"),
    (body(messages=None), "messages"),
    (body(messages=[]), "messages"),
    (body(messages="Hello!"), "messages"),
    (body(messages=USER), "messages"),
    (body(messages=[None]), "messages[0]"),
    (body(messages=[USER, "Hello!"]), "messages[1]"),
    (body(messages=[USER, [USER]]), "messages[1]"),
    (body(messages=[USER, {"content": "x"}]), "messages[1].role"),
    (body(messages=[USER, {"role": "tool", "content": "x"}]), "messages[1].role"),
    (body(messages=[USER, {"role": "USER", "content": "x"}]), "messages[1].role"),
    (body(messages=[USER, {"role": "", "content": "x"}]), "messages[1].role"),
    (body(messages=[USER, {"role": 0, "content": "x"}]), "messages[1].role"),
    (body(messages=[USER, {"role": ["user"], "content": "x"}]), "messages[1].role"),
    (body(messages=[USER, {"role": {"user": 1}, "content": "x"}]), "messages[1].role"),
    (body(messages=[USER, ROLE_OK, {"role": "bot", "content": "x"}]), "messages[2].role"),
    (body(messages=[{"role": "user"}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (body(messages=[USER, {"role": "user", "content": ["a"]}]), "messages[1].content"),
    (body(messages=[USER, {"role": "user", "content": {"text": "a"}}]), "messages[1].content"),
    (body(temperature=-0.1), "temperature"),
    (body(temperature=2.1), "temperature"),
    (body(temperature=2.0000001), "temperature"),
    (body(temperature="hot"), "temperature"),
    (body(temperature="1"), "temperature"),
    (body(temperature=True), "temperature"),
    (body(temperature=[1]), "temperature"),
    (body(top_p=1.5), "top_p"),
    (body(top_p=-0.1), "top_p"),
    (body(top_p=False), "top_p"),
    (body(top_p="1"), "top_p"),
    (body(max_tokens=0), "max_tokens"),
    (body(max_tokens=-1), "max_tokens"),
    (body(max_tokens=1.5), "max_tokens"),
    (body(max_tokens="10"), "max_tokens"),
    (body(max_tokens=True), "max_tokens"),
    (body(max_tokens=[10]), "max_tokens"),
    (body(n=0), "n"),
    (body(n=-1), "n"),
    (body(n=2.5), "n"),
    (body(n="2"), "n"),
    (body(n=True), "n"),
    (body(stream="yes"), "stream"),
    (body(stream="true"), "stream"),
    (body(stream=1), "stream"),
    (body(stream=0), "stream"),
    (body(stop=5), "stop"),
    (body(stop=[1]), "stop"),
    (body(stop=["a", None]), "stop"),
    (body(stop={"a": "b"}), "stop"),
    (body(stop=True), "stop"),
    (body(stream=True, stream_options="include_usage"), "stream_options"),
    (body(stream=True, stream_options=[True]), "stream_options"),
]


@pytest.mark.parametrize(("payload", "param"), REJECTED, ids=[f"{i}-{p}" for i, (_, p) in enumerate(REJECTED)])
def test_rejects_naming_the_field(payload, param):
    assert rejected(raw(payload)).param == param


def test_the_first_bad_message_is_named():
    payload = body(messages=[USER, {"role": "bot", "content": "x"}, {"role": "bot", "content": 5}])
    assert rejected(raw(payload)).param == "messages[1].role"


def test_bad_request_serialises_in_the_contract_shape():
    error = rejected(raw(body(top_p=7)))
    assert orjson.loads(error.body()) == {
        "error": {"message": error.message, "type": "invalid_request_error", "param": "top_p", "code": None}
    }


# Integers within 64 bits: orjson (and so the gateway) reads larger ones as floats.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.binary(max_size=100),
        _json.map(lambda v: json.dumps(v).encode()),
        st.tuples(
            st.sampled_from(["model", "messages", "temperature", "top_p", "max_tokens", "n", "stream", "stop",
                             "stream_options", "role", "content"]),
            _json,
        ).map(lambda kv: raw(body(messages=[{**USER, kv[0]: kv[1]}]) if kv[0] in ("role", "content")
                             else body(**{kv[0]: kv[1]}))),  # fmt: skip
    )
)
def test_any_input_is_accepted_or_a_bad_request(payload):
    """Never any other exception: that would be a 500 for bad input."""
    try:
        chat = parse_chat_request(payload)
    except BadRequest as error:
        assert error.param is None or isinstance(error.param, str)
        return
    assert isinstance(chat.body, dict) and isinstance(chat.model, str)
    assert upstream_body(payload, chat)


# --- the prompt token estimate --------------------------------------------------------------


def _msg(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ([], 2),
        ([""], 2 + 4),
        (["a"], 2 + 4 + 1),
        (["abcd"], 2 + 4 + 1),
        (["abcde"], 2 + 4 + 2),
        (["Hello!"], 2 + 4 + 2),
        (["x" * 100], 2 + 4 + 25),
        (["x" * 101], 2 + 4 + 26),
        (["Hello!", "", "x" * 9], 2 + (4 + 2) + (4 + 0) + (4 + 3)),
        (["ééé"], 2 + 4 + 1),  # characters, not UTF-8 bytes (6)
        (["😀😀😀😀😀"], 2 + 4 + 2),
    ],
)
def test_estimate_prompt_tokens(contents, expected):
    assert estimate_prompt_tokens([_msg(c) for c in contents]) == expected


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.text(max_size=200), max_size=6))
def test_estimate_follows_the_documented_formula(contents):
    expected = 2 + sum(4 + math.ceil(len(c) / 4) for c in contents)
    messages = [_msg(c) for c in contents]
    assert estimate_prompt_tokens(messages) == expected
    # The mock upstream counts prompt tokens the same way; the two must agree.
    assert mock_upstream.estimate_prompt_tokens(messages) == expected


def test_parsed_request_carries_the_estimate():
    messages = [{"role": "system", "content": "x" * 40}, _msg("Hello!")]
    assert parse_chat_request(raw(body(messages=messages))).prompt_estimate == 2 + (4 + 10) + (4 + 2)


# --- the bytes sent upstream ----------------------------------------------------------------


def _upstream(payload: bytes) -> tuple[bytes, ChatRequest]:
    chat = parse_chat_request(payload)
    return upstream_body(payload, chat), chat


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"stream": False},
        {"stream": None},
        {"stream": False, "stream_options": {"include_usage": False}},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": {"include_usage": True, "chunk_size": 3}},
    ],
)
def test_upstream_body_is_the_clients_own_bytes(fields):
    # Odd spacing and key order, which a re-encoding would lose.
    payload = ('{ "messages":[{"content":"Hi","role":"user"}],\n "model" : "crimson-falcon-4", "temperature": 1.0'
               + "".join(f', "{k}": {json.dumps(v)}' for k, v in fields.items()) + "}").encode()  # fmt: skip
    out, _ = _upstream(payload)
    assert out is payload


EXTRA = {
    "temperature": 0.1,
    "top_p": 1.0,
    "max_tokens": 9_223_372_036_854_775_807,
    "seed": -7,
    "stop": ["\n\n", "END"],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "metadata": {"nested": [1, 2.5, None, True, "ü"]},
    "user": "u-1",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 😀", "name": "a"}],
}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(None, {"include_usage": True}, id="absent"),
        pytest.param({}, {"include_usage": True}, id="empty"),
        pytest.param({"include_usage": False}, {"include_usage": True}, id="false"),
        pytest.param({"include_usage": False, "chunk": 3, "x": {"y": 1}}, {"include_usage": True, "chunk": 3,
                     "x": {"y": 1}}, id="other-keys-kept"),  # fmt: skip
    ],
)
def test_stream_gets_include_usage_and_keeps_every_other_field(options, expected):
    original = body(**EXTRA, stream=True)
    if options is not None:
        original["stream_options"] = options
    payload = raw(original)
    out, chat = _upstream(payload)
    assert out is not payload
    sent = json.loads(out)
    assert sent["stream_options"] == expected
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in original.items() if k != "stream_options"
    }
    assert isinstance(sent["temperature"], float) and isinstance(sent["max_tokens"], int)
    # Nothing the gateway keeps for itself was changed along the way.
    assert json.loads(payload) == original
    assert chat.body == original
    assert chat.wants_usage is False


def test_explicit_null_stream_options_becomes_include_usage():
    payload = raw(body(stream=True, stream_options=None))
    out, _ = _upstream(payload)
    assert json.loads(out) == body(stream=True, stream_options={"include_usage": True})


@settings(max_examples=200, deadline=None, database=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in {"model", "messages", "temperature", "top_p", "max_tokens",
                                                         "n", "stream", "stop", "stream_options"}),
        _json, max_size=5,
    ),  # fmt: skip
    options=st.dictionaries(st.text(max_size=6).filter(lambda k: k != "include_usage"), _json, max_size=3),
    stream=st.booleans(),
    asked=st.booleans(),
)
def test_upstream_body_property(extra, options, stream, asked):
    original = body(**extra, stream=stream, stream_options={**options, "include_usage": asked})
    payload = raw(original)
    out, _ = _upstream(payload)
    if not stream or asked:
        assert out is payload
        return
    assert json.loads(out) == {**original, "stream_options": {**options, "include_usage": True}}
