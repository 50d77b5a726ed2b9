"""Admin request bodies and query values: each check names the field (`param`) it rejects."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from gateway.admin.fields import KEY_FIELDS, MAX_INT, MAX_NAME, MAX_SECONDS, ORG_FIELDS, accepted
from gateway.errors import BadRequest, UnsupportedMediaType
from gateway.keys.orgs import valid_org

_KEY_ID = re.compile(r"key_[0-9a-f]{12}")
_AGE = re.compile(r"([0-9]{1,12})([smhd])")
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")  # Unix seconds: plain digits, no sign, no exponent
MAX_INSTANT = 253402300799  # 9999-12-31T23:59:59Z


async def read_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        if optional:
            return {}
        raise BadRequest("This route needs a JSON object body.")
    media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("Send the body as `Content-Type: application/json`.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


def only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for name in body:
        if name not in allowed:
            raise BadRequest(f"Unknown field `{name}`; expected some of: {', '.join(allowed)}.", param=name)


def name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise BadRequest(f"`{param}` must be a non-empty string of at most {MAX_NAME} characters.", param=param)
    return value


def key_id(value: str, param: str) -> str:
    if not _KEY_ID.fullmatch(value):
        raise BadRequest(f"`{param}` must be a key_id (`key_` and 12 hex digits).", param=param)
    return value


def page_size(text: str, param: str, largest: int) -> int:
    size = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else 0
    if not 1 <= size <= largest:
        raise BadRequest(f"`{param}` must be a whole number from 1 to {largest}.", param=param)
    return size


def org(value: Any, param: str) -> str | None:
    """An org name, or None (no org)."""
    return None if value is None else org_name(value, param)


def org_name(value: Any, param: str) -> str:
    """An org name, which must be given (null is refused)."""
    if not isinstance(value, str) or not valid_org(value):
        raise BadRequest(f"`{param}` must be 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit.",
                         param=param)  # fmt: skip
    return value


def limit(value: Any, param: str) -> int | None:
    """A whole number from 0 (no limit) to MAX_INT, or None. `5.0` is 5, as JSON Schema's `integer` has it."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise BadRequest(f"`{param}` must be a whole number from 0 (no limit) to {MAX_INT}, or null.", param=param)
    return value


def models(value: Any, param: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"`{param}` must be an array of model ids ([] = every model).", param=param)
    models: list[str] = []
    for i, model in enumerate(value):
        if not isinstance(model, str) or not model or len(model) > MAX_NAME or "," in model:
            raise BadRequest(f"`{param}[{i}]` must be a model id (a non-empty string without commas).",
                             param=f"{param}[{i}]")  # fmt: skip
        if model not in models:
            models.append(model)
    return tuple(models)


def seconds(value: Any, param: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRequest(f"`{param}` must be a number of seconds.", param=param)
    if value < 0 or (value == 0 and not allow_zero) or value > MAX_SECONDS:
        raise BadRequest(f"`{param}` must be a {'non-negative' if allow_zero else 'positive'} number of seconds.",
                         param=param)  # fmt: skip
    return float(value)


def expiry(body: dict[str, Any], now: float) -> dict[str, float | None]:
    """`expires_in` (seconds from now) or `expires_at` (Unix seconds, or null: never)."""
    if "expires_in" in body and "expires_at" in body:
        raise BadRequest("Give either `expires_in` or `expires_at`, not both.", param="expires_at")
    if "expires_in" in body:
        return {"expires_at": now + seconds(body["expires_in"], "expires_in")}
    if "expires_at" in body:
        value = body["expires_at"]
        if value is None:
            return {"expires_at": None}
        return {"expires_at": seconds(value, "expires_at")}
    return {}


KEY_LIMITS = ("rpm", "tpm", "max_concurrent")
KEY_CREATE_FIELDS = accepted(KEY_FIELDS, "create")
KEY_UPDATE_FIELDS = accepted(KEY_FIELDS, "update")
ORG_CREATE_FIELDS = accepted(ORG_FIELDS, "create")
ORG_UPDATE_FIELDS = accepted(ORG_FIELDS, "update")


def instant(text: str, param: str, now: float) -> float:
    """An age (`90m`, `7d`), Unix seconds, or an RFC 3339 date-time (`2026-11-25T10:00:00Z`), from 1970 to
    the end of 9999 (what the aggregates' UTC period names can spell): `fields.INSTANT`."""
    value = _instant(text, now)
    if value is None:
        raise BadRequest(f"`{param}` must be an RFC 3339 date-time (2026-11-25T10:00:00Z), Unix seconds or an "
                         "age (90m, 2h, 7d).", param=param)  # fmt: skip
    if not 0 <= value <= MAX_INSTANT:
        raise BadRequest(f"`{param}` must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z.", param=param)
    return value


def _instant(text: str, now: float) -> float | None:
    age = _AGE.fullmatch(text)
    if age:
        return now - int(age.group(1)) * _UNITS[age.group(2)]
    if _SECONDS.fullmatch(text):
        return float(text)
    if not _DATE_TIME.fullmatch(text):
        return None
    try:
        parsed = datetime.fromisoformat(text.upper())
    except ValueError:  # a day or an hour that does not exist
        return None
    return parsed.timestamp()
