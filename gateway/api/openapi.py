"""The OpenAPI 3.1 document of the client API (CONTRACT §1), served at `GET /openapi.json`.

The request body of `POST /v1/chat/completions` is generated from the same declarations that
`api/validation.py` compiles into the request path's checks (`PROFILES`): one schema per
profile the configured models use (`liutong`, the seed reference, for every model today; a
second profile is a second entry of `PROFILES`, and the body becomes `anyOf` the profiles'
schemas). Errors are the contract's (§2), each with the statuses the gateway itself can answer;
an upstream's own errors pass through with their status and body (`default`).

The document needs no key: it holds no secret, and it names no configured model (a model's id
is a plain string here, the example is the seed's), so that it cannot tell anyone about models a
key may not use; `GET /v1/models` lists those, for a key. `/metrics` is listed only where it is
served (the main port without `admin_listen`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from aiohttp import web

from gateway.api.validation import DEFAULT_PROFILE, PROFILES, Profile
from gateway.state import STATE

_NULL = {"type": "null"}
# One event of a stream: `data:` is a chunk's JSON, a last `{"error": …}` of a cut stream, or `[DONE]`.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A `chat.completion.chunk` as JSON, or `[DONE]`."}},
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_HEADER_STRING = {"schema": {"type": "string"}}
_REQUEST_ID = {"x-request-id": {**_HEADER_STRING, "required": True,
                                "description": "The client's own (1-128 of `[A-Za-z0-9._:-]`) or a new one."}}  # fmt: skip
_RATELIMIT = {
    f"x-ratelimit-{what}-{unit}": {**_HEADER_STRING, "description": f"The tighter of key and org: {what} {unit}."}
    for what in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens")
}
_RETRY = {
    "retry-after": {**_HEADER_STRING, "description": "Whole seconds until the request can fit (≥ 1)."},
    "retry-after-ms": {**_HEADER_STRING, "description": "Milliseconds until the request can fit."},
    "x-should-retry": {**_HEADER_STRING, "description": "`false` when the request can never fit."},
}
_ERRORS = {
    "400": "The body is not a valid request (`param` names the field, e.g. `messages[2].role`).",
    "401": "Missing, malformed, unknown, revoked, disabled or expired key (`invalid_api_key`).",
    "404": "Unknown model, or a model this key may not use (`model_not_found`).",
    "408": "The body did not arrive within `request_body_timeout` (`request_timeout`).",
    "413": "The body is larger than `max_body_bytes`.",
    "415": "The body is not `application/json`.",
    "429": "A limit of the key or its org is exhausted (`rate_limit_exceeded`; `type` names the limit).",
    "502": "The upstream refused or broke the connection (`upstream_unavailable`).",
    "503": "No healthy upstream, draining, or the store is unreachable under `fail_closed`.",
    "504": "The upstream did not answer in time (`upstream_timeout`).",
}


def profile_schema(profile: Profile) -> dict[str, Any]:
    """The request body of one profile, from its declarations."""
    properties: dict[str, Any] = {}
    required = []
    for name, field in profile.fields.items():
        schema = field.schema if field.required else {"anyOf": [field.schema, _NULL]}
        properties[name] = {**schema, "description": field.description} if field.description else schema
        if field.required:
            required.append(name)
    item = profile.messages
    item_required = [name for name, f in item.fields.items() if f.required]
    properties["messages"] = {
        "type": "array",
        "minItems": 1,
        "description": item.description,
        "items": {
            "type": "object",
            "properties": {name: f.schema for name, f in item.fields.items()},
            "required": item_required,
        },
    }
    order = [*required[:1], "messages", *[n for n in properties if n not in required[:1] and n != "messages"]]
    return {
        "title": profile.title,
        "type": "object",
        "properties": {name: properties[name] for name in order},
        "required": [*required, "messages"],
        "description": "Fields not listed here are forwarded to the model server untouched.",
    }


def _error(status: str) -> dict[str, Any]:
    headers = {**_REQUEST_ID, **(_RATELIMIT | _RETRY if status == "429" else {})}
    return {"description": _ERRORS[status], "headers": headers, "content": {"application/json": {"schema": _ERROR_REF}}}


def _chat_completion() -> dict[str, Any]:
    choice = {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "properties": {"role": {"type": "string"}, "content": {"type": ["string", "null"]}},
            },
            "finish_reason": {"type": ["string", "null"]},
        },
    }
    usage = {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }
    return {
        "type": "object",
        "required": ["id", "object", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": usage,
        },
    }


def _chat_operation(profiles: list[str]) -> dict[str, Any]:
    schemas = [{"$ref": f"#/components/schemas/ChatRequest.{name}"} for name in profiles]
    body_schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    example = PROFILES[profiles[0]].example
    return {
        "operationId": "createChatCompletion",
        "summary": "A chat completion, as JSON or as a server-sent event stream (`stream: true`)",
        "description": "Authenticated, validated against the model's request-schema profile ("
        + ", ".join(f"`{p}`" for p in profiles)
        + "), rate-limited and forwarded to an upstream of the model. A stream that breaks after it began "
        'ends with one `data: {"error": …}` event and no `[DONE]`.',
        "security": [{"bearerKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema, "example": example}}},
        "responses": {
            "200": {
                "description": "The model's answer, passed through.",
                "headers": {**_REQUEST_ID, **_RATELIMIT},
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            },
            **{status: _error(status) for status in _ERRORS},
            "default": {
                "description": "An error of the model server itself, passed through with its status and body.",
                "headers": _REQUEST_ID,
            },
        },
    }


def _plain(op_id: str, summary: str, responses: dict[str, Any], *, security: bool = False) -> dict[str, Any]:
    requirement: list[dict[str, list[str]]] = [{"bearerKey": []}] if security else []  # [] = no key needed
    return {"get": {"operationId": op_id, "summary": summary, "security": requirement, "responses": responses}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "headers": _REQUEST_ID, "content": {"application/json": {"schema": schema}}}


def document(profiles: list[str], *, metrics: bool) -> dict[str, Any]:
    """The client API's document for the profiles the configured models use."""
    model = {
        "type": "object",
        "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
    }  # fmt: skip
    paths: dict[str, Any] = {
        "/v1/chat/completions": {"post": _chat_operation(profiles)},
        "/v1/models": _plain("listModels", "The models this key may use", {
            "200": _json({"type": "object", "required": ["object", "data"], "properties": {
                "object": {"const": "list"}, "data": {"type": "array", "items": model}}}, "The models."),
            "401": _error("401"),
            "503": _error("503"),
        }, security=True),
        "/healthz": _plain("healthz", "Liveness: 200 while the process serves", {
            "200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}, "Alive.")}),
        "/readyz": _plain("readyz", "Readiness: 200 only when the gateway can serve", {
            "200": _json({"type": "object", "properties": {"status": {"const": "ready"},
                                                           "store": {"type": "string"}}}, "Ready."),
            "503": _json({"type": "object", "required": ["reasons"], "properties": {
                "status": {"const": "unavailable"},
                "reasons": {"type": "array", "items": {"enum": ["draining", "store_unavailable",
                                                                 "no_healthy_upstream"]}}}},
                "Not ready, and why.")}),
        "/openapi.json": _plain("openapi", "This document", {"200": _json({"type": "object"}, "The document.")}),
    }  # fmt: skip
    if metrics:
        paths["/metrics"] = _plain("metrics", "Prometheus text exposition", {
            "200": {"description": "The metrics.", "headers": _REQUEST_ID,
                    "content": {"text/plain": {"schema": {"type": "string"}}}}})  # fmt: skip
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    }  # fmt: skip
    schemas = {f"ChatRequest.{name}": profile_schema(PROFILES[name]) for name in profiles}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Liutong Gateway client API",
            "version": "1",
            "description": "The Liutong Chat Completions API behind the gateway's keys and limits. Errors the "
            'gateway makes are `{"error": {message, type, param, code}}`; any route may also answer what the '
            "HTTP layer answers before routing (400 `malformed_request`, 408, 431) and 405 to a method it does "
            "not list.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerKey": {"type": "http", "scheme": "bearer", "bearerFormat": "lt_ key"}},
            "schemas": {"Error": error, "ChatCompletion": _chat_completion(), **schemas},
        },
    }


def profiles_in_use(app: web.Application) -> list[str]:
    """The request-schema profiles of the configured models (each model's `schema`, default `liutong`)."""
    state = app[STATE]
    used = {getattr(pool.route, "schema", DEFAULT_PROFILE) for pool in state.pools.values()} or {DEFAULT_PROFILE}
    return sorted(used, key=lambda name: (name != DEFAULT_PROFILE, name))


@cache
def _encoded(profiles: tuple[str, ...], metrics: bool) -> bytes:
    return orjson.dumps(document(list(profiles), metrics=metrics))


async def openapi_handler(request: web.Request) -> web.Response:
    """`GET /openapi.json`, for the profiles the current config uses (SIGHUP may change them)."""
    state = request.app[STATE]
    body = _encoded(tuple(profiles_in_use(request.app)), state.settings.admin_listen is None)
    return web.Response(body=body, content_type="application/json")
