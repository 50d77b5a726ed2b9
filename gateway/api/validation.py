"""Validate a Chat Completions request body (CONTRACT §2) and estimate its token cost.

What a body must look like is declared once per request-schema profile (`PROFILES`; `liutong`,
the seed reference, is the default): each `Field` holds the JSON Schema of its value and the
400's message. The checks the request path runs are compiled from those schemas once, at import
(`compile_check`), and `GET /openapi.json` (`gateway/api/openapi.py`) publishes the very same
schemas, so the document and the validation cannot drift. The body is decoded once with orjson;
the original bytes are what goes upstream unless the gateway must change a field. Each failure
names the field's path in `param`, e.g. `messages[2].role`. Fields no profile constrains pass
through untouched; null stands for the default of every optional field.

Token estimate (what tpm reserves before forwarding): per message 4 + ⌈characters / 4⌉,
plus 2 for the reply's priming, plus `max_tokens` (or the configured default) × `n`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import BadRequest

MAX_INT64 = 2**63 - 1  # orjson decodes larger integers as floats: no integer field may exceed it
MAX_N = 128  # OpenAI's own bound on `n`, which model servers share (the mock upstream too)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    n: int
    max_tokens: int | None
    prompt_estimate: int
    wants_usage: bool  # the client asked for `stream_options.include_usage` itself


# --- declarations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a request body (or of an object inside it): its value's schema and the 400's
    message (`{param}` is replaced by the field's path). A required field may not be null."""

    schema: dict[str, Any]
    message: str
    required: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class ArrayOfObjects:
    """A required, non-empty array whose items are objects with their own fields (`messages`)."""

    message: str  # the array itself is missing, empty or not an array
    item_message: str  # an item is not an object
    fields: dict[str, Field]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Profile:
    """A request schema: the body's fields, the array of messages, and an example body."""

    name: str
    title: str
    fields: dict[str, Field]
    messages: ArrayOfObjects
    example: dict[str, Any] = field(default_factory=dict)


_POSITIVE_INT = {"type": "integer", "minimum": 1, "maximum": MAX_INT64}

LIUTONG = Profile(
    name="liutong",
    title="Liutong Chat Completions (the seed reference)",
    fields={
        "model": Field({"type": "string", "minLength": 1}, "`model` is required and must be a non-empty string.",
                       required=True, description="Model ID (e.g. `crimson-falcon-4`)."),
        "temperature": Field({"type": "number", "minimum": 0, "maximum": 2},
                             "`temperature` must be a number between 0 and 2.",
                             description="Sampling temperature (0-2). Default: 1.0."),
        "top_p": Field({"type": "number", "minimum": 0, "maximum": 1}, "`top_p` must be a number between 0 and 1.",
                       description="Nucleus sampling. Default: 1.0."),
        "max_tokens": Field(_POSITIVE_INT, "`max_tokens` must be a positive integer.",
                            description="Max tokens to generate."),
        "n": Field({"type": "integer", "minimum": 1, "maximum": MAX_N}, f"`n` must be a whole number from 1 to {MAX_N}.",
                   description=f"Number of completions (at most {MAX_N}). Default: 1."),
        "stream": Field({"type": "boolean"}, "`stream` must be a boolean.",
                        description="Stream partial responses via SSE. Default: false."),
        "stop": Field({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                      "`stop` must be a string or an array of strings.", description="Stop sequence(s)."),
        "stream_options": Field({"type": "object"}, "`stream_options` must be an object.",
                                description="`include_usage: true` adds a last chunk with the usage."),
    },
    messages=ArrayOfObjects(
        "`messages` is required and must be a non-empty array.",
        "`{param}` must be an object.",
        {
            "role": Field({"type": "string", "enum": ["system", "user", "assistant"]},
                          "`{param}` must be one of system, user, assistant.", required=True),
            "content": Field({"type": "string"}, "`{param}` must be a string.", required=True,
                             description="The message content."),
        },
        description="Array of message objects.",
    ),
    example={
        "model": "crimson-falcon-4",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Explain quantum entanglement in simple terms."},
        ],
        "temperature": 0.7,
        "max_tokens": 512,
    },
)  # fmt: skip
PROFILES: dict[str, Profile] = {LIUTONG.name: LIUTONG}
DEFAULT_PROFILE = LIUTONG.name


# --- the checks, compiled from the schemas --------------------------------------------------
#
# Each schema becomes one Python expression (`type(v) is int and 1 <= v <= 9223372036854775807`),
# and a profile's whole check one function built from them with `exec` at import: as fast as the
# hand-written checks it replaces, and never out of step with the schemas it publishes.

_TYPES = {
    "string": "type({v}) is str",
    "integer": "type({v}) is int",  # orjson gives exact ints; `true` is a bool, not an int
    "number": "(type({v}) is int or type({v}) is float)",
    "boolean": "type({v}) is bool",
    "array": "type({v}) is list",
    "object": "type({v}) is dict",
    "null": "{v} is None",
}
_KEYWORDS = frozenset(("type", "enum", "minimum", "maximum", "minLength", "items", "anyOf"))


def check_expression(schema: dict[str, Any], v: str, constants: dict[str, Any]) -> str:
    """A Python expression, true when the value named `v` is valid under `schema` (the subset of
    JSON Schema the profiles use: any other keyword is refused here, at import, so that a
    declaration never says more than the check enforces). Sets and such go into `constants`."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"the validation compiler does not implement {sorted(unknown)}")
    if "anyOf" in schema:
        return "(" + " or ".join(check_expression(s, v, constants) for s in schema["anyOf"]) + ")"
    parts = [_TYPES[schema["type"]].format(v=v)]
    if "enum" in schema:
        name = f"_c{len(constants)}"
        constants[name] = frozenset(schema["enum"])
        parts.append(f"{v} in {name}")
    if "minimum" in schema or "maximum" in schema:
        low, high = schema.get("minimum"), schema.get("maximum")
        parts.append(" <= ".join(x for x in (None if low is None else repr(low), v,
                                             None if high is None else repr(high)) if x))  # fmt: skip
    if "minLength" in schema:
        parts.append(f"len({v}) >= {int(schema['minLength'])}")
    if "items" in schema:
        item = f"{v}_"
        parts.append(f"all({check_expression(schema['items'], item, constants)} for {item} in {v})")
    return "(" + " and ".join(parts) + ")"


def compile_check(schema: dict[str, Any]) -> Callable[[Any], bool]:
    """The schema's check as a function of one value (for tests and tools)."""
    constants: dict[str, Any] = {}
    source = f"def check(v):\n    return {check_expression(schema, 'v', constants)}\n"
    exec(source, constants)  # noqa: S102 (source built only from the declarations above)
    return constants["check"]  # type: ignore[no-any-return]


def _compile(profile: Profile) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """The profile's whole check: it raises the first failure's 400, in declaration order (the
    required fields, the messages, then the optional fields), and returns the messages."""
    constants: dict[str, Any] = {"BadRequest": BadRequest}

    def message(text: str) -> str:
        name = f"_m{len(constants)}"
        constants[name] = text
        return name

    lines = ["def check(body):"]
    for name, f in profile.fields.items():
        if f.required:
            lines += [f"    v = body.get({name!r})",
                      f"    if not {check_expression(f.schema, 'v', constants)}:",
                      f"        raise BadRequest({message(f.message)}, param={name!r})"]  # fmt: skip
    array = profile.messages
    lines += ["    messages = body.get('messages')",
              "    if type(messages) is not list or not messages:",
              f"        raise BadRequest({message(array.message)}, param='messages')",
              "    for i, item in enumerate(messages):",
              "        if type(item) is not dict:",
              "            param = f'messages[{i}]'",
              f"            raise BadRequest({message(array.item_message)}.format(param=param), param=param)"]  # fmt: skip
    for name, f in array.fields.items():
        lines += [f"        v = item.get({name!r})",
                  f"        if not {check_expression(f.schema, 'v', constants)}:",
                  f"            param = f'messages[{{i}}].{name}'",
                  f"            raise BadRequest({message(f.message)}.format(param=param), param=param)"]  # fmt: skip
    for name, f in profile.fields.items():
        if not f.required:
            lines += [f"    v = body.get({name!r})",
                      f"    if v is not None and not {check_expression(f.schema, 'v', constants)}:",
                      f"        raise BadRequest({message(f.message)}, param={name!r})"]  # fmt: skip
    lines.append("    return messages")
    exec("\n".join(lines) + "\n", constants)  # noqa: S102 (source built only from the declarations above)
    return constants["check"]  # type: ignore[no-any-return]


_CHECKS = {name: _compile(profile) for name, profile in PROFILES.items()}


# --- the request path -----------------------------------------------------------------------


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 2
    for message in messages:
        total += 4 + (len(message["content"]) + 3) // 4
    return total


def parse_chat_request(raw: bytes, profile: str = DEFAULT_PROFILE) -> ChatRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if type(body) is not dict:
        raise BadRequest("The request body must be a JSON object.")
    messages = _CHECKS[profile](body)
    options = body.get("stream_options")
    n = body.get("n")
    stream = body.get("stream")
    return ChatRequest(
        body=body,
        model=body["model"],
        stream=stream is True,
        n=1 if n is None else n,
        max_tokens=body.get("max_tokens"),
        prompt_estimate=estimate_prompt_tokens(messages),
        wants_usage=bool(options and options.get("include_usage") is True),
    )


def upstream_body(raw: bytes, request: ChatRequest) -> bytes:
    """The bytes to send upstream: the client's own, or with `include_usage` added to a stream."""
    if not request.stream or request.wants_usage:
        return raw
    body = dict(request.body)
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body)
