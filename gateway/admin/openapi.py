"""The OpenAPI 3.1 document of the admin API, served at `/admin/openapi.json`.

Built from the same field lists the handlers in `admin/routes.py` check (`KEY_CREATE_FIELDS`, …), with
`additionalProperties: false` on every request body because the handlers reject unknown fields.
The tests validate the document, check that its operations are exactly `admin.ROUTES`, and
validate every answer they get from the routes against the response schema documented here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

_NULLABLE_INT = {"type": ["integer", "null"], "minimum": 0}
_NULLABLE_STR = {"type": ["string", "null"]}
_ORG_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"}
_MAX_SECONDS = 100 * 365 * 86400


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required is not None:
        schema["required"] = required
    return schema


_KEY = {
    "key_id": {"type": "string", "description": "The public id of the key (never secret)."},
    "name": {"type": "string"},
    "org": {**_NULLABLE_STR, "description": "The org whose org-wide limits this key shares."},
    "models": {"type": "array", "items": {"type": "string"}, "description": "Allowed models; empty = all."},
    "rpm": {**_NULLABLE_INT, "description": "Requests per minute; null = the config default, 0 = no limit."},
    "tpm": {**_NULLABLE_INT, "description": "Tokens per minute; null = the config default, 0 = no limit."},
    "max_concurrent": {**_NULLABLE_INT, "description": "Requests in flight; null = the config default."},
    "expires_at": {"type": ["number", "null"], "description": "Unix seconds; null = never."},
    "disabled": {"type": "boolean"},
    "revoked_at": {"type": ["number", "null"],
                   "description": "Unix seconds. In the future for a rotated key: it works until then."},
    "created_at": {"type": "number", "description": "Unix seconds."},
    "status": {"type": "string", "enum": ["active", "revoked", "disabled", "expired"]},
}  # fmt: skip
_SECRET = {"key": {"type": "string", "pattern": "^lt_[A-Za-z0-9]{32,}$",
                   "description": "The plaintext key. Shown only in this answer: store it now."}}  # fmt: skip
_LIMIT_FIELDS = {
    "rpm": _NULLABLE_INT,
    "tpm": _NULLABLE_INT,
    "max_concurrent": _NULLABLE_INT,
}
_EXPIRY_FIELDS = {
    "expires_in": {"type": "number", "exclusiveMinimum": 0, "maximum": _MAX_SECONDS,
                   "description": "Seconds from now."},
    "expires_at": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": _MAX_SECONDS,
                   "description": "Unix seconds; null = never."},
}
_ORG = {
    "org": {"type": "string"},
    "rpm": {**_NULLABLE_INT, "description": "Requests per minute shared by all the org's keys; null or 0 = none."},
    "tpm": {**_NULLABLE_INT, "description": "Tokens per minute shared by all the org's keys; null or 0 = none."},
    "created_at": {"type": "number"},
    "updated_at": {"type": "number"},
}
_USAGE_COUNTS = {
    "requests": {"type": "integer"},
    "prompt_tokens": {"type": "integer"},
    "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"},
    "errors": {"type": "integer", "description": "Requests answered with a status ≥ 400."},
    "cost_micros": {"type": "integer", "description": "Settled cost in micro-units of `currency` (never a float)."},
    "unpriced": {"type": "integer", "description": "Requests of models without a price (counted as 0 in cost)."},
}

_SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": _object({
        "message": {"type": "string"},
        "type": {"type": "string"},
        "param": _NULLABLE_STR,
        "code": _NULLABLE_STR,
    }, ["message", "type", "param", "code"])}, ["error"]),  # fmt: skip
    "Key": _object(_KEY, list(_KEY)),
    "NewKey": _object({**_SECRET, **_KEY}, [*_SECRET, *_KEY]),
    "RotatedKey": _object({**_SECRET, **_KEY, "previous": _ref("Key")}, [*_SECRET, *_KEY, "previous"]),
    "KeyList": _object({
        "object": {"const": "list"},
        "data": {"type": "array", "items": _ref("Key")},
        "has_more": {"type": "boolean"},
        "last_id": {**_NULLABLE_STR, "description": "Pass as `after` to get the next page."},
    }, ["object", "data", "has_more", "last_id"]),  # fmt: skip
    "KeyCreate": _object({
        "name": _NAME,
        "org": {"anyOf": [_ORG_NAME, {"type": "null"}]},
        "models": {"type": "array", "items": {"type": "string", "minLength": 1, "pattern": "^[^,]+$"}},
        **_LIMIT_FIELDS,
        **_EXPIRY_FIELDS,
    }, ["name"]),  # fmt: skip
    "KeyUpdate": {**_object({
        "name": _NAME,
        "org": {"anyOf": [_ORG_NAME, {"type": "null"}]},
        "models": {"type": "array", "items": {"type": "string", "minLength": 1, "pattern": "^[^,]+$"}},
        **_LIMIT_FIELDS,
        **_EXPIRY_FIELDS,
        "disabled": {"type": "boolean"},
    }), "minProperties": 1},  # fmt: skip
    "Rotate": _object({
        "overlap_seconds": {"type": "number", "minimum": 0, "maximum": _MAX_SECONDS,
                            "description": "How long the old key keeps working (default: admin.rotation_overlap)."},
    }),  # fmt: skip
    "Org": _object(_ORG, list(_ORG)),
    "OrgList": _object({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Org")}},
                       ["object", "data"]),  # fmt: skip
    "OrgCreate": _object({"org": _ORG_NAME, "rpm": _NULLABLE_INT, "tpm": _NULLABLE_INT}, ["org"]),
    "OrgUpdate": {**_object({"rpm": _NULLABLE_INT, "tpm": _NULLABLE_INT}), "minProperties": 1},
    "Usage": _object({
        "object": {"const": "usage"},
        "key_id": _NULLABLE_STR,
        "org": _NULLABLE_STR,
        "granularity": {"type": "string", "enum": ["hour", "day"]},
        "since": {"type": "string", "format": "date-time", "description": "Start of the first period covered."},
        "until": {"type": "string", "format": "date-time", "description": "End of the last period covered."},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code of `pricing.currency`."},
        "totals": _object(_USAGE_COUNTS, list(_USAGE_COUNTS)),
        "data": {"type": "array", "items": _object({"start": {"type": "string", "format": "date-time"},
                                                    **_USAGE_COUNTS}, ["start", *_USAGE_COUNTS])},
    }, ["object", "key_id", "org", "granularity", "since", "until", "currency", "totals", "data"]),  # fmt: skip
    "Principal": _object({
        "object": {"const": "admin"},
        "subject": _NULLABLE_STR,
        "role": {"type": "string", "enum": ["admin", "viewer"]},
        "openapi": {"type": "string"},
    }, ["object", "subject", "role", "openapi"]),  # fmt: skip
}

_ERRORS = {
    "400": "A field or parameter is invalid; `param` names it.",
    "401": "No token, or the token fails verification (signature, algorithm, exp, aud, iss).",
    "403": "The token's role does not allow this route.",
    "404": "No such key or org.",
    "409": "Conflict: the org exists already, or the key is revoked or rotated.",
    "415": "The body is not `application/json`.",
}


def _error(status: str) -> dict[str, Any]:
    return {"description": _ERRORS[status], "content": {"application/json": {"schema": _ref("Error")}}}


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _operation(op_id: str, summary: str, role: str, ok: tuple[str, str, str], *, errors: tuple[str, ...] = (),
               body: str | None = None, body_required: bool = True,
               parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    status, schema, description = ok
    operation: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "description": f"Needs the `{role}` role.",
        "x-required-role": role,
        "responses": {status: _ok(schema, description), **{e: _error(e) for e in ("401", "403", *errors)}},
    }
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": _ref(body)}}}
    return operation


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_KEY_ID = _path_param("key_id", "The key's public id, e.g. `key_0123456789ab`.")
_ORG_PATH = _path_param("org", "The org's name.")
_INSTANT = {"type": "string"}
_INSTANT_HELP = "ISO 8601 (`2026-11-25T10:00:00Z`; UTC when no zone), Unix seconds, or an age (`90m`, `2h`, `7d`)."


def _key_action(op_id: str, summary: str) -> dict[str, Any]:
    return {"post": _operation(op_id, summary, "admin", ("200", "Key", "The key after the change."), errors=("404",))}


@cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Liutong Gateway admin API",
            "version": "1",
            "description": "Keys, org-wide limits and usage. Every route needs a JWT bearer token whose role "
            "claim grants `viewer` (read) or `admin` (read and write). Errors use the gateway's JSON error format.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerJwt": []}],
        "paths": {
            "/admin/": {"get": _operation("whoami", "Who the token says you are", "viewer",
                                          ("200", "Principal", "The token's subject and role."))},
            "/admin/openapi.json": {"get": {
                **_operation("openapi", "This document", "viewer", ("200", "Principal", "The OpenAPI document.")),
                "responses": {
                    "200": {"description": "The OpenAPI document.", "content": {"application/json": {
                        "schema": {"type": "object"}}}},
                    "401": _error("401"),
                    "403": _error("403"),
                },
            }},  # fmt: skip
            "/admin/keys": {
                "get": _operation("listKeys", "List keys, oldest first", "viewer",
                                  ("200", "KeyList", "A page of keys."), errors=("400",), parameters=[
                    _query("org", {"type": "string"}, "Only the keys of this org."),
                    _query("name", {"type": "string"}, "Only the keys with exactly this name."),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                           "Page size."),
                    _query("after", {"type": "string"}, "The previous page's `last_id`."),
                ]),  # fmt: skip
                "post": _operation("createKey", "Create a key; the answer holds the plaintext key, once", "admin",
                                   ("201", "NewKey", "The new key, with its plaintext (`Cache-Control: no-store`)."),
                                   errors=("400", "415"), body="KeyCreate"),  # fmt: skip
            },
            "/admin/keys/{key_id}": {
                "parameters": [_KEY_ID],
                "get": _operation("showKey", "Show a key", "viewer", ("200", "Key", "The key."), errors=("404",)),
                "patch": _operation("updateKey", "Change a key's name, org, models, limits, expiry or disabled flag",
                                    "admin", ("200", "Key", "The key after the change."),
                                    errors=("400", "404", "415"), body="KeyUpdate"),  # fmt: skip
            },
            "/admin/keys/{key_id}/disable": {"parameters": [_KEY_ID], **_key_action("disableKey", "Disable a key")},
            "/admin/keys/{key_id}/enable": {"parameters": [_KEY_ID], **_key_action("enableKey", "Enable a key")},
            "/admin/keys/{key_id}/revoke": {"parameters": [_KEY_ID],
                                            **_key_action("revokeKey", "Revoke a key, for good")},  # fmt: skip
            "/admin/keys/{key_id}/rotate": {
                "parameters": [_KEY_ID],
                "post": _operation("rotateKey", "Replace a key: a new key now, the old one revoked after the overlap",
                                   "admin", ("200", "RotatedKey", "The new key with its plaintext, and the old one."),
                                   errors=("400", "404", "409", "415"), body="Rotate", body_required=False),
            },  # fmt: skip
            "/admin/orgs": {
                "get": _operation("listOrgs", "List orgs", "viewer", ("200", "OrgList", "Every org.")),
                "post": _operation("createOrg", "Create an org with org-wide limits", "admin",
                                   ("201", "Org", "The new org."), errors=("400", "409", "415"), body="OrgCreate"),
            },  # fmt: skip
            "/admin/orgs/{org}": {
                "parameters": [_ORG_PATH],
                "get": _operation("showOrg", "Show an org", "viewer", ("200", "Org", "The org."), errors=("404",)),
                "patch": _operation("updateOrg", "Change an org's limits (null removes one)", "admin",
                                    ("200", "Org", "The org after the change."), errors=("400", "404", "415"),
                                    body="OrgUpdate"),  # fmt: skip
            },
            "/admin/usage": {"get": _operation(
                "usage", "Usage of one key or one org over a time range, per hour or per day", "viewer",
                ("200", "Usage", "Totals and the non-empty periods; the range is widened to whole periods (UTC)."),
                errors=("400",), parameters=[
                    _query("key_id", {"type": "string"}, "The key (give this or `org`)."),
                    _query("org", {"type": "string"}, "The org (give this or `key_id`)."),
                    _query("since", _INSTANT, f"Start (default: 24 h before `until`). {_INSTANT_HELP}"),
                    _query("until", _INSTANT, f"End (default: now). {_INSTANT_HELP}"),
                    _query("granularity", {"type": "string", "enum": ["hour", "day"], "default": "hour"},
                           "Period of the aggregates."),
                ])},  # fmt: skip
        },
        "components": {
            "securitySchemes": {"bearerJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": _SCHEMAS,
        },
    }
