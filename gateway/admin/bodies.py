"""Admin request bodies and query values: each check names the field (`param`) it rejects."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import BadRequest, UnsupportedMediaType
from gateway.keys.orgs import valid_org

MAX_INT = 10**12
_AGE = re.compile(r"([0-9]{1,12})([smhd])")
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
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise BadRequest(f"`{param}` must be a non-empty string of at most 200 characters.", param=param)
    return value


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
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise BadRequest(f"`{param}` must be a whole number ≥ 0 (0 = no limit), or null.", param=param)
    return value


def models(value: Any, param: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"`{param}` must be an array of model ids ([] = every model).", param=param)
    models: list[str] = []
    for i, model in enumerate(value):
        if not isinstance(model, str) or not model or len(model) > 200 or "," in model:
            raise BadRequest(f"`{param}[{i}]` must be a model id (a non-empty string without commas).",
                             param=f"{param}[{i}]")  # fmt: skip
        if model not in models:
            models.append(model)
    return tuple(models)


def seconds(value: Any, param: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRequest(f"`{param}` must be a number of seconds.", param=param)
    if value < 0 or (value == 0 and not allow_zero) or value > 100 * 365 * 86400:
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
KEY_CREATE_FIELDS = ("name", "org", "models", *KEY_LIMITS, "expires_in", "expires_at")
KEY_UPDATE_FIELDS = ("name", "org", "models", *KEY_LIMITS, "expires_in", "expires_at", "disabled")
ORG_CREATE_FIELDS = ("org", "rpm", "tpm")
ORG_UPDATE_FIELDS = ("rpm", "tpm")


def instant(text: str, param: str, now: float) -> float:
    """ISO 8601 (`2026-11-25T10:00:00Z`; no zone = UTC), Unix seconds, or an age (`90m`, `7d`),
    from 1970 to the end of 9999 (what the aggregates' UTC period names can spell)."""
    value = _instant(text.strip(), now)
    if value is None:
        raise BadRequest(f"`{param}` must be ISO 8601 (2026-11-25T10:00:00Z), Unix seconds or an age "
                         "(90m, 2h, 7d).", param=param)  # fmt: skip
    if not 0 <= value <= MAX_INSTANT:  # also refuses NaN
        raise BadRequest(f"`{param}` must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z.", param=param)
    return value


def _instant(text: str, now: float) -> float | None:
    age = _AGE.fullmatch(text)
    if age:
        return now - int(age.group(1)) * _UNITS[age.group(2)]
    if _SECONDS.fullmatch(text):
        return float(text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
