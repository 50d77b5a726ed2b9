"""The fields of the admin API's key and org objects, each declared once.

A `Field` holds a field's JSON Schema in answers and in request bodies, and which bodies take
it. The handlers' lists of accepted fields (`admin/bodies.py`) and the OpenAPI schemas
(`admin/openapi.py`) both come from these tables, so a new field (a quota, say) is one entry
here plus the check of its value in `admin/bodies.py`; the tests hold the checks to the schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_INT = 10**12  # the largest limit a key or org may have
MAX_SECONDS = 100 * 365 * 86400  # the longest duration, and the latest `expires_at`
KEY_ID_PATTERN = "^key_[0-9a-f]{12}$"
ORG_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_NAME = 200

NULL: dict[str, Any] = {"type": "null"}
KEY_ID: dict[str, Any] = {"type": "string", "pattern": KEY_ID_PATTERN}
ORG: dict[str, Any] = {"type": "string", "pattern": ORG_PATTERN}
NAME: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": "\\S"}
MODEL: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": "^[^,]+$"}
LIMIT: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
UNIX_SECONDS: dict[str, Any] = {"type": "number", "minimum": 0}
AGE_PATTERN = "^[0-9]{1,12}[smhd]$"  # an instant as an age: `90m`, `2h`, `7d`
SECONDS_PATTERN = "^[0-9]{1,12}(\\.[0-9]{1,9})?$"  # an instant in Unix seconds
# An instant in query parameters: an age, Unix seconds or an RFC 3339 date-time (with its zone).
INSTANT: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": AGE_PATTERN},
        {"type": "string", "pattern": SECONDS_PATTERN},
        {"type": "string", "format": "date-time"},
    ]
}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


@dataclass(frozen=True, slots=True)
class Field:
    description: str
    answer: dict[str, Any] | None  # the value's schema in answers; None: a request-only field
    request: dict[str, Any] | None = None  # the value's schema in bodies; None: read-only
    create: bool = True  # taken by the create body (when `request` is set)
    update: bool = True  # taken by the update (PATCH) body
    required: bool = False  # required on create


def _limit(what: str, null_means: str) -> Field:
    return Field(
        f"{what}; null = {null_means}, 0 = no limit.", nullable({"type": "integer", "minimum": 0}), nullable(LIMIT)
    )


KEY_FIELDS: dict[str, Field] = {
    "key_id": Field("The public id of the key (never secret).", KEY_ID),
    "name": Field("A label for people.", {"type": "string"}, NAME, required=True),
    "org": Field(
        "The org whose org-wide limits this key shares; null = none.", nullable({"type": "string"}), nullable(ORG)
    ),
    "models": Field(
        "Allowed models; empty = all.",
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": MODEL},
    ),
    "rpm": _limit("Requests per minute", "the config default"),
    "tpm": _limit("Tokens per minute", "the config default"),
    "max_concurrent": _limit("Requests in flight", "the config default"),
    "expires_in": Field(
        "Seconds from now until the key expires (instead of `expires_at`).",
        None,
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
    ),
    "expires_at": Field(
        "When the key expires, Unix seconds; null = never.",
        nullable(UNIX_SECONDS),
        nullable({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}),
    ),
    "disabled": Field(
        "A disabled key is refused until it is enabled.", {"type": "boolean"}, {"type": "boolean"}, create=False
    ),
    "revoked_at": Field("Unix seconds. In the future for a rotated key: it works until then.", nullable(UNIX_SECONDS)),
    "created_at": Field("Unix seconds.", UNIX_SECONDS),
    "status": Field("What the key is now.", {"type": "string", "enum": ["active", "revoked", "disabled", "expired"]}),
}
KEY_EXCLUSIVE = (("expires_in", "expires_at"),)  # fields that a body may not give together

ORG_FIELDS: dict[str, Field] = {
    "org": Field("The org's name.", {"type": "string"}, ORG, update=False, required=True),
    "rpm": _limit("Requests per minute shared by all the org's keys", "none"),
    "tpm": _limit("Tokens per minute shared by all the org's keys", "none"),
    "created_at": Field("Unix seconds.", UNIX_SECONDS),
    "updated_at": Field("Unix seconds.", UNIX_SECONDS),
}


def accepted(fields: dict[str, Field], body: str) -> tuple[str, ...]:
    """The fields a `create` or `update` body takes, in declaration order."""
    return tuple(name for name, f in fields.items() if f.request is not None and getattr(f, body))


def answered(fields: dict[str, Field]) -> tuple[str, ...]:
    return tuple(name for name, f in fields.items() if f.answer is not None)
