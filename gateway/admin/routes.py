"""The admin API under `/admin/` (CONTRACT §9): keys, orgs and usage over HTTP, behind JWTs.

`setup_admin(app, state)` registers the routes of `ROUTES` on the main app (or on the admin
listener's app when `admin_listen` is set), each guarded by the `JwtVerifier`: a viewer token
may read, an admin token may also write. With no verifier configured nothing is registered,
so every `/admin/` path answers the contract's 404. Handlers go through the same services as
the CLI (`KeyService`, `OrgService`), whose writes publish invalidation events; a plaintext
key appears only in the answer to create and rotate (marked `Cache-Control: no-store`) and is
never logged. Every write is logged once with the token's subject. The OpenAPI document of
these routes is `admin/openapi.py`'s, served at `/admin/openapi.json`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway.admin import bodies
from gateway.admin.openapi import MAX_PAGE, MAX_USAGE_BUCKETS, document
from gateway.admin.verifier import ADMIN, VIEWER, JwtVerifier, Principal
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound, StoreUnavailable
from gateway.keys.orgs import OrgExists, OrgNotFound, OrgService
from gateway.keys.records import KeyNotFound, KeyRecord, KeyRevoked
from gateway.state import EXCHANGE, AppState
from gateway.store import names

log = structlog.get_logger("liutong.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class AdminContext:
    state: AppState
    verifier: JwtVerifier
    orgs: OrgService
    rotation_overlap: float


ADMIN_CONTEXT = web.AppKey("admin", AdminContext)
PRINCIPAL = web.RequestKey("admin_principal", Principal)


def _json(status: int, payload: object, *, secret: bool = False) -> web.Response:
    headers = {"Cache-Control": "no-store"} if secret else None
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers)


def _not_found(message: str, code: str, param: str | None = None) -> NotFound:
    err = NotFound(message, param=param)
    err.code = code
    return err


def _audit(request: web.Request, action: str, **fields: Any) -> None:
    principal = request[PRINCIPAL]
    log.info("admin_action", action=action, subject=principal.subject, role=principal.role,
             request_id=request[EXCHANGE].request_id, **fields)  # fmt: skip


# --- keys -----------------------------------------------------------------------------------


def _state(request: web.Request) -> AppState:
    return request.app[ADMIN_CONTEXT].state


async def _key(request: web.Request) -> KeyRecord:
    try:
        return await _state(request).keys.get(request.match_info["key_id"])
    except KeyNotFound:
        raise _not_found(f"No key with key_id {request.match_info['key_id']!r}.", "key_not_found") from None


async def list_keys(request: web.Request) -> web.Response:
    query = request.query
    for param in query:
        if param not in ("org", "name", "limit", "after"):
            raise BadRequest(f"Unknown query parameter `{param}`.", param=param)
    limit = bodies.page_size(query.get("limit", "100"), "limit", MAX_PAGE)
    org = bodies.org_name(query["org"], "org") if "org" in query else None
    name = bodies.name(query["name"], "name") if "name" in query else None
    after = bodies.key_id(query["after"], "after") if "after" in query else None
    records = await _state(request).keys.list(org=org, name=name)
    start = 0
    if after is not None:
        ids = [r.key_id for r in records]
        if after not in ids:
            raise _not_found(f"`after`: no key {after!r} in this listing; pass the previous page's `last_id`.",
                             "key_not_found", "after")  # fmt: skip
        start = ids.index(after) + 1
    page = records[start : start + limit]
    return _json(200, {
        "object": "list",
        "data": [r.public() for r in page],
        "has_more": start + limit < len(records),
        "last_id": page[-1].key_id if page else None,
    })  # fmt: skip


async def create_key(request: web.Request) -> web.Response:
    body = await bodies.read_body(request)
    bodies.only(body, bodies.KEY_CREATE_FIELDS)
    if "name" not in body:
        raise BadRequest("`name` is required.", param="name")
    now = time.time()
    expiry = bodies.expiry(body, now).get("expires_at")
    plaintext, record = await _state(request).keys.create(
        bodies.name(body["name"], "name"),
        org=bodies.org(body.get("org"), "org"),
        models=bodies.models(body.get("models", []), "models"),
        rpm=bodies.limit(body.get("rpm"), "rpm"),
        tpm=bodies.limit(body.get("tpm"), "tpm"),
        max_concurrent=bodies.limit(body.get("max_concurrent"), "max_concurrent"),
        expires_in=None if expiry is None else expiry - now,
        now=now,
    )
    _audit(request, "key.create", key_id=record.key_id, org=record.org)
    return _json(201, {"key": plaintext, **record.public()}, secret=True)


async def show_key(request: web.Request) -> web.Response:
    return _json(200, (await _key(request)).public())


async def update_key(request: web.Request) -> web.Response:
    body = await bodies.read_body(request)
    bodies.only(body, bodies.KEY_UPDATE_FIELDS)
    if not body:
        raise BadRequest(f"Give at least one field to change: {', '.join(bodies.KEY_UPDATE_FIELDS)}.")
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = bodies.name(body["name"], "name")
    if "org" in body:
        changes["org"] = bodies.org(body["org"], "org")
    if "models" in body:
        changes["models"] = bodies.models(body["models"], "models")
    for field in bodies.KEY_LIMITS:
        if field in body:
            changes[field] = bodies.limit(body[field], field)
    changes.update(bodies.expiry(body, time.time()))
    if "disabled" in body:
        if not isinstance(body["disabled"], bool):
            raise BadRequest("`disabled` must be true or false.", param="disabled")
        changes["disabled"] = body["disabled"]
    record = await _key(request)
    record = await _state(request).keys.update(record.key_id, **changes)
    _audit(request, "key.update", key_id=record.key_id, fields=sorted(changes))
    return _json(200, record.public())


async def _set_disabled(request: web.Request, disabled: bool) -> web.Response:
    record = await _key(request)
    record = await _state(request).keys.update(record.key_id, disabled=disabled)
    _audit(request, "key.disable" if disabled else "key.enable", key_id=record.key_id)
    return _json(200, record.public())


async def disable_key(request: web.Request) -> web.Response:
    return await _set_disabled(request, True)


async def enable_key(request: web.Request) -> web.Response:
    return await _set_disabled(request, False)


async def rotate_key(request: web.Request) -> web.Response:
    body = await bodies.read_body(request, optional=True)
    bodies.only(body, ("overlap_seconds",))
    overlap = request.app[ADMIN_CONTEXT].rotation_overlap
    if "overlap_seconds" in body:
        overlap = bodies.seconds(body["overlap_seconds"], "overlap_seconds", allow_zero=True)
    record = await _key(request)
    try:
        plaintext, new, old = await _state(request).keys.rotate(record.key_id, overlap=overlap)
    except KeyRevoked:
        raise Conflict(f"Key {record.key_id} is revoked or already rotated; it cannot be rotated.",
                       code="key_revoked") from None  # fmt: skip
    _audit(request, "key.rotate", key_id=old.key_id, new_key_id=new.key_id, overlap_seconds=overlap)
    return _json(200, {"key": plaintext, **new.public(), "previous": old.public()}, secret=True)


async def revoke_key(request: web.Request) -> web.Response:
    record = await _key(request)
    record = await _state(request).keys.revoke(record.key_id)
    _audit(request, "key.revoke", key_id=record.key_id)
    return _json(200, record.public())


# --- orgs -----------------------------------------------------------------------------------


def _orgs(request: web.Request) -> OrgService:
    return request.app[ADMIN_CONTEXT].orgs


async def list_orgs(request: web.Request) -> web.Response:
    return _json(200, {"object": "list", "data": [o.public() for o in await _orgs(request).list()]})


async def create_org(request: web.Request) -> web.Response:
    body = await bodies.read_body(request)
    bodies.only(body, bodies.ORG_CREATE_FIELDS)
    if "org" not in body:
        raise BadRequest("`org` is required.", param="org")
    org = bodies.org_name(body["org"], "org")
    try:
        record = await _orgs(request).create(
            org, rpm=bodies.limit(body.get("rpm"), "rpm"), tpm=bodies.limit(body.get("tpm"), "tpm")
        )
    except OrgExists:
        raise Conflict(f"Org {org!r} exists already; change its limits with PATCH.", code="org_exists",
                       param="org") from None  # fmt: skip
    _audit(request, "org.create", org=org)
    return _json(201, record.public())


async def show_org(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    try:
        return _json(200, (await _orgs(request).get(org)).public())
    except OrgNotFound:
        raise _not_found(f"No org {org!r}.", "org_not_found") from None


async def update_org(request: web.Request) -> web.Response:
    body = await bodies.read_body(request)
    bodies.only(body, bodies.ORG_UPDATE_FIELDS)
    if not body:
        raise BadRequest("Give at least one field to change: rpm, tpm.")
    changes = {name: bodies.limit(body[name], name) for name in bodies.ORG_UPDATE_FIELDS if name in body}
    org = request.match_info["org"]
    try:
        record = await _orgs(request).update(org, **changes)
    except OrgNotFound:
        raise _not_found(f"No org {org!r}.", "org_not_found") from None
    _audit(request, "org.update", org=org, fields=sorted(changes))
    return _json(200, record.public())


# --- usage ----------------------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


_USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors", "cost_micros", "unpriced")


async def usage(request: web.Request) -> web.Response:
    """Sums of the hourly or daily usage aggregates of one key or one org over a time range."""
    query = request.query
    for name in query:
        if name not in ("key_id", "org", "since", "until", "granularity"):
            raise BadRequest(f"Unknown query parameter `{name}`.", param=name)
    if ("key_id" in query) == ("org" in query):
        raise BadRequest("Give exactly one of `key_id` and `org`.", param="key_id")
    if "key_id" in query:
        scope, name = "key", bodies.key_id(query["key_id"], "key_id")
    else:
        scope, name = "org", bodies.org_name(query["org"], "org")
    granularity = query.get("granularity", "hour")
    if granularity not in ("hour", "day"):
        raise BadRequest("`granularity` must be `hour` or `day`.", param="granularity")
    now = time.time()
    until = bodies.instant(query["until"], "until", now) if "until" in query else now
    since = bodies.instant(query["since"], "since", now) if "since" in query else until - 86400
    if since >= until:
        raise BadRequest("`since` must be before `until`.", param="since")
    step = 3600 if granularity == "hour" else 86400
    start = int(since // step * step)  # aggregates are per UTC hour / day: widen to whole periods
    end = int(-(-until // step) * step)
    if (end - start) // step > MAX_USAGE_BUCKETS:
        raise BadRequest(f"That range spans more than {MAX_USAGE_BUCKETS} {granularity}s; narrow it or use "
                         "`granularity=day`.", param="since")  # fmt: skip
    pattern = "h:%Y%m%d%H" if granularity == "hour" else "d:%Y%m%d"
    periods = list(range(start, end, step))
    pipe = _state(request).store.redis.pipeline(transaction=False)
    for period in periods:
        pipe.hgetall(names.usage_aggregate(scope, name, time.strftime(pattern, time.gmtime(period))))
    raws = await pipe.execute() if periods else []
    totals = dict.fromkeys(_USAGE_FIELDS, 0)
    data = []
    for period, raw in zip(periods, raws, strict=True):
        if not raw:
            continue
        bucket = {f: int(raw.get(f.encode(), 0)) for f in _USAGE_FIELDS}
        for f in _USAGE_FIELDS:
            totals[f] += bucket[f]
        data.append({"start": _iso(period), **bucket,
                     "total_tokens": bucket["prompt_tokens"] + bucket["completion_tokens"]})  # fmt: skip
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    return _json(200, {
        "object": "usage",
        "key_id": name if scope == "key" else None,
        "org": name if scope == "org" else None,
        "granularity": granularity,
        "since": _iso(start),
        "until": _iso(end),
        "currency": _state(request).settings.pricing.currency,
        "totals": totals,
        "data": data,
    })  # fmt: skip


# --- the rest -------------------------------------------------------------------------------


async def whoami(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    return _json(200, {"object": "admin", "subject": principal.subject, "role": principal.role,
                       "openapi": "/admin/openapi.json"})  # fmt: skip


async def openapi(request: web.Request) -> web.Response:
    return _json(200, document())


# (method, path, role needed, handler): the routes, as `admin/openapi.py` documents them.
ROUTES: tuple[tuple[str, str, str, Handler], ...] = (
    ("GET", "/admin/", VIEWER, whoami),
    ("GET", "/admin/openapi.json", VIEWER, openapi),
    ("GET", "/admin/keys", VIEWER, list_keys),
    ("POST", "/admin/keys", ADMIN, create_key),
    ("GET", "/admin/keys/{key_id}", VIEWER, show_key),
    ("PATCH", "/admin/keys/{key_id}", ADMIN, update_key),
    ("POST", "/admin/keys/{key_id}/disable", ADMIN, disable_key),
    ("POST", "/admin/keys/{key_id}/enable", ADMIN, enable_key),
    ("POST", "/admin/keys/{key_id}/rotate", ADMIN, rotate_key),
    ("POST", "/admin/keys/{key_id}/revoke", ADMIN, revoke_key),
    ("GET", "/admin/orgs", VIEWER, list_orgs),
    ("POST", "/admin/orgs", ADMIN, create_org),
    ("GET", "/admin/orgs/{org}", VIEWER, show_org),
    ("PATCH", "/admin/orgs/{org}", ADMIN, update_org),
    ("GET", "/admin/usage", VIEWER, usage),
)


def _guarded(role: str, handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        principal = await request.app[ADMIN_CONTEXT].verifier.verify(request.headers.get("Authorization"))
        if role == ADMIN and not principal.can_write:
            raise Forbidden("This route changes state and needs the admin role; this token grants viewer only.")
        request[PRINCIPAL] = principal
        try:
            return await handler(request)
        except (RedisError, OSError):
            raise StoreUnavailable("The key store is unreachable; try again shortly.") from None

    return guarded


def setup_admin(app: web.Application, state: AppState) -> None:
    """Register the admin routes on `app`, if a verifier is configured (else `/admin/` is 404)."""
    config = state.settings.admin.jwt
    if config is None:
        return
    verifier = JwtVerifier(config)
    app[ADMIN_CONTEXT] = AdminContext(state, verifier, OrgService(state.store.redis, state.events),
                                      state.settings.admin.rotation_overlap)  # fmt: skip

    async def close_verifier(_: web.Application) -> None:
        await verifier.close()

    app.on_cleanup.append(close_verifier)
    for method, path, role, handler in ROUTES:
        app.router.add_route(method, path, _guarded(role, handler))

