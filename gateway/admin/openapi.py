"""The OpenAPI 3.1 document of the admin API, served at `/admin/openapi.json`.

Object schemas come from the field tables of `admin/fields.py`, the same tables that give the
handlers their lists of accepted fields, with `additionalProperties: false` on every request
body because the handlers reject unknown fields. The document says exactly what the server
takes: whole numbers with their bounds, fields that exclude each other (`not: {required: …}`),
the patterns of ids, names and cursors, and every status each route can answer (errors in the
contract's format). What JSON Schema cannot say (that `since` is before `until`, that a range
spans at most `MAX_USAGE_BUCKETS` periods) is in the operation's description and answered 400.
The tests validate the document, check that its operations are exactly `admin.ROUTES`, hold
every answer to it, and run schemathesis against a real gateway with it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from gateway.admin.fields import (
    INSTANT,
    KEY_EXCLUSIVE,
    KEY_FIELDS,
    KEY_ID,
    KEY_ID_PATTERN,
    MAX_SECONDS,
    NAME,
    ORG,
    ORG_FIELDS,
    Field,
    accepted,
    answered,
    nullable,
)

MAX_PAGE = 1000
MAX_USAGE_BUCKETS = 2000
_NULLABLE_STR = nullable({"type": "string"})
_COUNT = {"type": "integer", "minimum": 0}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _described(field: Field, schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "description": field.description}


def _answer(fields: dict[str, Field]) -> dict[str, Any]:
    names = answered(fields)
    return _object({n: _described(fields[n], fields[n].answer or {}) for n in names}, list(names))


def _body(fields: dict[str, Field], body: str, exclusive: tuple[tuple[str, ...], ...] = ()) -> dict[str, Any]:
    names = accepted(fields, body)
    required = [n for n in names if fields[n].required] if body == "create" else []
    schema = _object({n: _described(fields[n], fields[n].request or {}) for n in names}, required)
    if body == "update":
        schema["minProperties"] = 1
    rules = [{"not": {"required": list(group)}} for group in exclusive]
    if rules:
        schema["allOf"] = rules
    return schema


_USAGE_COUNTS = {
    "requests": _COUNT,
    "prompt_tokens": _COUNT,
    "completion_tokens": _COUNT,
    "total_tokens": _COUNT,
    "errors": {**_COUNT, "description": "Requests answered with a status ≥ 400."},
    "cost_micros": {**_COUNT, "description": "Settled cost in micro-units of `currency` (never a float)."},
    "unpriced": {**_COUNT, "description": "Requests of models without a price (counted as 0 in cost)."},
}
_SECRET = {
    "key": {
        "type": "string",
        "pattern": "^lt_[A-Za-z0-9]{32,}$",
        "description": "The plaintext key. Shown only in this answer: store it now.",
    }
}
_KEY = _answer(KEY_FIELDS)


def _with_secret(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    properties = {**_SECRET, **_KEY["properties"], **(extra or {})}
    return _object(properties, list(properties))


_SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": _object(
                {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _NULLABLE_STR,
                    "code": _NULLABLE_STR,
                },
                ["message", "type", "param", "code"],
            )
        },
        ["error"],
    ),
    "Key": _KEY,
    "NewKey": _with_secret(),
    "RotatedKey": _with_secret({"previous": _ref("Key")}),
    "KeyList": _object(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Key")},
            "has_more": {"type": "boolean"},
            "last_id": {**nullable(KEY_ID), "description": "Pass as `after` to get the next page."},
        },
        ["object", "data", "has_more", "last_id"],
    ),
    "KeyCreate": _body(KEY_FIELDS, "create", KEY_EXCLUSIVE),
    "KeyUpdate": _body(KEY_FIELDS, "update", KEY_EXCLUSIVE),
    "Rotate": _object(
        {
            "overlap_seconds": {
                "type": "number",
                "minimum": 0,
                "maximum": MAX_SECONDS,
                "description": "How long the old key keeps working (default: admin.rotation_overlap).",
            }
        }
    ),
    "Org": _answer(ORG_FIELDS),
    "OrgList": _object(
        {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Org")}}, ["object", "data"]
    ),
    "OrgCreate": _body(ORG_FIELDS, "create"),
    "OrgUpdate": _body(ORG_FIELDS, "update"),
    "Usage": _object(
        {
            "object": {"const": "usage"},
            "key_id": nullable(KEY_ID),
            "org": nullable(ORG),
            "granularity": {"type": "string", "enum": ["hour", "day"]},
            "since": {"type": "string", "format": "date-time", "description": "Start of the first period covered."},
            "until": {"type": "string", "format": "date-time", "description": "End of the last period covered."},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code of `pricing.currency`."},
            "totals": _object(_USAGE_COUNTS, list(_USAGE_COUNTS)),
            "data": {
                "type": "array",
                "items": _object(
                    {"start": {"type": "string", "format": "date-time"}, **_USAGE_COUNTS}, ["start", *_USAGE_COUNTS]
                ),
            },
        },
        ["object", "key_id", "org", "granularity", "since", "until", "currency", "totals", "data"],
    ),
    "Principal": _object(
        {
            "object": {"const": "admin"},
            "subject": _NULLABLE_STR,
            "role": {"type": "string", "enum": ["admin", "viewer"]},
            "openapi": {"type": "string"},
        },
        ["object", "subject", "role", "openapi"],
    ),
}

_ERRORS = {
    "400": "A field or parameter is invalid; `param` names it.",
    "401": "No token, or the token fails verification (signature, algorithm, exp, aud, iss).",
    "403": "The token's role does not allow this route.",
    "404": "No such key or org (`param` names the parameter when it is not in the path).",
    "409": "Conflict: the org exists already, or the key is revoked or rotated.",
    "413": "The body is larger than `max_body_bytes`.",
    "415": "The body is not `application/json`.",
    "503": "The store (Redis) or the JWKS endpoint does not answer; try again shortly.",
}
_EVERY_ROUTE = ("401", "403", "503")  # the token is checked first (JWKS may be down); every handler reads the store
_BODY = ("400", "413", "415")  # a route that reads a JSON body


def _error(status: str) -> dict[str, Any]:
    return {"description": _ERRORS[status], "content": {"application/json": {"schema": _ref("Error")}}}


def _json_answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(
    op_id: str,
    summary: str,
    role: str,
    ok: tuple[str, dict[str, Any], str],
    *,
    errors: tuple[str, ...] = (),
    body: str | None = None,
    body_required: bool = True,
    parameters: list[dict[str, Any]] | None = None,
    notes: str = "",
) -> dict[str, Any]:
    status, schema, description = ok
    codes = sorted({*_EVERY_ROUTE, *errors, *(_BODY if body else ())})
    operation: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "description": f"Needs the `{role}` role.{' ' + notes if notes else ''}",
        "x-required-role": role,
        "responses": {status: _json_answer(schema, description), **{code: _error(code) for code in codes}},
    }
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": _ref(body)}}}
    return operation


def _path_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


# A key_id or org in the path that is not well formed names nothing: 404, like an unknown one.
_KEY_ID_PATH = _path_param("key_id", {"type": "string"}, f"The key's public id (`{KEY_ID_PATTERN}`).")
_ORG_PATH = _path_param("org", {"type": "string"}, "The org's name.")
_INSTANT_HELP = (
    "An RFC 3339 date-time (`2026-11-25T10:00:00Z`), Unix seconds, or an age (`90m`, `2h`, `7d`), "
    "from 1970 to the end of 9999."
)
_KEY_ANSWER = ("200", _ref("Key"), "The key after the change.")

# The usage scope: `key_id` or `org`, exactly one. One query parameter whose value is an object,
# form-exploded, puts each property on the query string as itself (`?key_id=…` or `?org=…`), so
# that the document can say that they exclude each other.
_USAGE_SCOPE = {
    "name": "scope",
    "in": "query",
    "required": True,
    "style": "form",
    "explode": True,
    "schema": {
        "type": "object",
        "properties": {"key_id": {**KEY_ID, "description": "The key."}, "org": {**ORG, "description": "The org."}},
        "additionalProperties": False,
        "oneOf": [{"required": ["key_id"]}, {"required": ["org"]}],
    },
    "description": "Exactly one of `key_id` (the key) and `org` (the org), each a query parameter of its own.",
}


def _key_action(op_id: str, summary: str) -> dict[str, Any]:
    return {"post": _operation(op_id, summary, "admin", _KEY_ANSWER, errors=("404",))}


@cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Liutong Gateway admin API",
            "version": "1",
            "description": "Keys, org-wide limits and usage. Every route needs a JWT bearer token whose role "
            "claim grants `viewer` (read) or `admin` (read and write). Errors use the gateway's JSON error format. "
            "Any route may also answer what the HTTP layer answers before routing: 400 `malformed_request`, "
            "408 `request_timeout`, 431 `request_header_fields_too_large`; a method a path does not list is 405.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerJwt": []}],
        "paths": {
            "/admin/": {
                "get": _operation(
                    "whoami",
                    "Who the token says you are",
                    "viewer",
                    ("200", _ref("Principal"), "The token's subject and role."),
                )
            },
            "/admin/openapi.json": {
                "get": _operation(
                    "openapi", "This document", "viewer", ("200", {"type": "object"}, "The OpenAPI document.")
                )
            },
            "/admin/keys": {
                "get": _operation(
                    "listKeys",
                    "List keys, oldest first",
                    "viewer",
                    ("200", _ref("KeyList"), "A page of keys."),
                    errors=("400", "404"),
                    parameters=[
                        _query("org", ORG, "Only the keys of this org."),
                        _query("name", NAME, "Only the keys with exactly this name."),
                        _query(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
                            "Page size.",
                        ),
                        _query(
                            "after",
                            KEY_ID,
                            "The previous page's `last_id` (404 when no key of this listing has that id).",
                        ),
                    ],
                ),
                "post": _operation(
                    "createKey",
                    "Create a key; the answer holds the plaintext key, once",
                    "admin",
                    ("201", _ref("NewKey"), "The new key, with its plaintext (`Cache-Control: no-store`)."),
                    body="KeyCreate",
                ),
            },
            "/admin/keys/{key_id}": {
                "parameters": [_KEY_ID_PATH],
                "get": _operation("showKey", "Show a key", "viewer", ("200", _ref("Key"), "The key."), errors=("404",)),
                "patch": _operation(
                    "updateKey",
                    "Change a key's name, org, models, limits, expiry or disabled flag",
                    "admin",
                    _KEY_ANSWER,
                    errors=("404",),
                    body="KeyUpdate",
                ),
            },
            "/admin/keys/{key_id}/disable": {
                "parameters": [_KEY_ID_PATH],
                **_key_action("disableKey", "Disable a key"),
            },
            "/admin/keys/{key_id}/enable": {"parameters": [_KEY_ID_PATH], **_key_action("enableKey", "Enable a key")},
            "/admin/keys/{key_id}/revoke": {
                "parameters": [_KEY_ID_PATH],
                **_key_action("revokeKey", "Revoke a key, for good"),
            },
            "/admin/keys/{key_id}/rotate": {
                "parameters": [_KEY_ID_PATH],
                "post": _operation(
                    "rotateKey",
                    "Replace a key: a new key now, the old one revoked after the overlap",
                    "admin",
                    ("200", _ref("RotatedKey"), "The new key with its plaintext, and the old one."),
                    errors=("404", "409"),
                    body="Rotate",
                    body_required=False,
                ),
            },
            "/admin/orgs": {
                "get": _operation("listOrgs", "List orgs", "viewer", ("200", _ref("OrgList"), "Every org.")),
                "post": _operation(
                    "createOrg",
                    "Create an org with org-wide limits",
                    "admin",
                    ("201", _ref("Org"), "The new org."),
                    errors=("409",),
                    body="OrgCreate",
                ),
            },
            "/admin/orgs/{org}": {
                "parameters": [_ORG_PATH],
                "get": _operation(
                    "showOrg", "Show an org", "viewer", ("200", _ref("Org"), "The org."), errors=("404",)
                ),
                "patch": _operation(
                    "updateOrg",
                    "Change an org's limits (null removes one)",
                    "admin",
                    ("200", _ref("Org"), "The org after the change."),
                    errors=("404",),
                    body="OrgUpdate",
                ),
            },
            "/admin/usage": {
                "get": _operation(
                    "usage",
                    "Usage of one key or one org over a time range, per hour or per day",
                    "viewer",
                    (
                        "200",
                        _ref("Usage"),
                        "Totals and the non-empty periods; the range is widened to whole periods (UTC).",
                    ),
                    errors=("400",),
                    notes=f"`since` must be before `until`, and the range may span at most {MAX_USAGE_BUCKETS} "
                    "periods of the granularity (else 400, `param: since`).",
                    parameters=[
                        _USAGE_SCOPE,
                        _query("since", INSTANT, f"Start (default: 24 h before `until`). {_INSTANT_HELP}"),
                        _query("until", INSTANT, f"End (default: now). {_INSTANT_HELP}"),
                        _query(
                            "granularity",
                            {"type": "string", "enum": ["hour", "day"], "default": "hour"},
                            "Period of the aggregates.",
                        ),
                    ],
                )
            },
        },
        "components": {
            "securitySchemes": {"bearerJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": _SCHEMAS,
        },
    }
