"""The mock upstream's reading of a request: the x-mock-* control headers and the body's plan
(model, n, stream, usage, length cap, stop strings), each bad value a 400 naming its `param`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

import orjson

DEFAULT_TOKENS: Final = 16
MAX_TOKENS_HEADER: Final = 1_000_000
MAX_N: Final = 128


class BadMockRequest(Exception):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclasses.dataclass(frozen=True, slots=True)
class Controls:
    """The x-mock-* request headers, parsed."""

    status: int | None
    delay_ms: int
    first_event_delay_ms: int
    interval_ms: int
    drop_after: int | None
    no_usage: bool
    tokens: int

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> Controls:
        status = int_header(headers, "x-mock-status", 400, 599)
        drop = int_header(headers, "x-mock-drop-after", 0, None)
        tokens = int_header(headers, "x-mock-tokens", 0, MAX_TOKENS_HEADER)
        no_usage = headers.get("x-mock-no-usage", "0").strip().lower()
        if no_usage not in ("0", "1", "true", "false"):
            raise BadMockRequest("x-mock-no-usage must be 0 or 1", "x-mock-no-usage")
        return cls(
            status=status,
            delay_ms=int_header(headers, "x-mock-delay-ms", 0, None) or 0,
            first_event_delay_ms=int_header(headers, "x-mock-first-event-delay-ms", 0, None) or 0,
            interval_ms=int_header(headers, "x-mock-interval-ms", 0, None) or 0,
            drop_after=drop,
            no_usage=no_usage in ("1", "true"),
            tokens=DEFAULT_TOKENS if tokens is None else tokens,
        )


def int_header(headers: Mapping[str, str], name: str, low: int, high: int | None) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BadMockRequest(f"header {name} must be an integer {bound}, got {raw!r}", name)
    return value


def error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})


def forced_error(status: int) -> bytes:
    type_, code = "server_error", None
    if status == 401:
        type_, code = "invalid_request_error", "invalid_api_key"
    elif status == 404:
        type_, code = "invalid_request_error", "model_not_found"
    elif status == 429:
        type_, code = "requests", "rate_limit_exceeded"
    elif status < 500:
        type_ = "invalid_request_error"
    return error_body(f"mock upstream: forced status {status}", type_, None, code)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What to generate for one valid request."""

    model: str
    n: int
    stream: bool
    include_usage: bool
    cap: int | None
    stops: tuple[str, ...]
    prompt: str


def parse_body(raw: bytes) -> tuple[Any, Plan]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadMockRequest("request body is not valid JSON", None) from None
    if not isinstance(body, dict):
        raise BadMockRequest("request body must be a JSON object", None)
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str):
        raise BadMockRequest("'model' is required and must be a string", "model")
    if not isinstance(messages, list):
        raise BadMockRequest("'messages' is required and must be an array", "messages")
    n = positive(body, "n", MAX_N)
    cap = positive(body, "max_completion_tokens", None) or positive(body, "max_tokens", None)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadMockRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadMockRequest("'stream_options' must be an object", "stream_options")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadMockRequest("'stop' must be a string or an array of strings", "stop")
    last = messages[-1] if messages else None
    prompt = last.get("content") if isinstance(last, dict) else None
    return body, Plan(
        model=model,
        n=n or 1,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage") is True),
        cap=cap,
        stops=tuple(s for s in stops if s),
        prompt=prompt if isinstance(prompt, str) else "",
    )


def positive(body: Mapping[str, Any], name: str, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadMockRequest(f"'{name}' must be a positive integer", name)
    if high is not None and value > high:
        raise BadMockRequest(f"'{name}' must be at most {high}", name)
    return value
