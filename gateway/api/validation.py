"""Validate a Chat Completions request body (CONTRACT §2) and estimate its token cost.

The body is decoded once with orjson; the original bytes are what goes upstream unless the
gateway must change a field. Each failure names the field's path in `param`, e.g.
`messages[2].role`. Fields the contract does not constrain pass through untouched.

Token estimate (what tpm reserves before forwarding): per message 4 + ⌈characters / 4⌉,
plus 2 for the reply's priming, plus `max_tokens` (or the configured default) × `n`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequest

ROLES = frozenset(("system", "user", "assistant"))


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    n: int
    max_tokens: int | None
    prompt_estimate: int
    wants_usage: bool  # the client asked for `stream_options.include_usage` itself


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 2
    for message in messages:
        total += 4 + (len(message["content"]) + 3) // 4
    return total


def parse_chat_request(raw: bytes) -> ChatRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required and must be a non-empty string.", param="model")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` is required and must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"`messages[{i}]` must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(
                f"`messages[{i}].role` must be one of system, user, assistant.", param=f"messages[{i}].role"
            )
        if not isinstance(message.get("content"), str):
            raise BadRequest(f"`messages[{i}].content` must be a string.", param=f"messages[{i}].content")

    temperature = body.get("temperature")
    if temperature is not None and not (_number(temperature) and 0 <= temperature <= 2):
        raise BadRequest("`temperature` must be a number between 0 and 2.", param="temperature")
    top_p = body.get("top_p")
    if top_p is not None and not (_number(top_p) and 0 <= top_p <= 1):
        raise BadRequest("`top_p` must be a number between 0 and 1.", param="top_p")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and not _positive_int(max_tokens):
        raise BadRequest("`max_tokens` must be a positive integer.", param="max_tokens")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _positive_int(n):
        raise BadRequest("`n` must be a positive integer.", param="n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean.", param="stream")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest("`stop` must be a string or an array of strings.", param="stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object.", param="stream_options")
    wants_usage = bool(options and options.get("include_usage") is True)

    return ChatRequest(
        body=body,
        model=model,
        stream=stream,
        n=n,
        max_tokens=max_tokens,
        prompt_estimate=estimate_prompt_tokens(messages),
        wants_usage=wants_usage,
    )


def upstream_body(raw: bytes, request: ChatRequest) -> bytes:
    """The bytes to send upstream: the client's own, or with `include_usage` added to a stream."""
    if not request.stream or request.wants_usage:
        return raw
    body = dict(request.body)
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body)
