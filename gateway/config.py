"""Settings: frozen dataclasses with their defaults, read from one YAML file and `LIUTONG_*`.

`load_settings(path, env)` is the only reader. The environment is passed in as a mapping (tests
give their own) and wins over the file. Every bad value raises `ConfigError` naming its field,
so that the process refuses to start with a message an operator can act on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway.store.topology import parse_redis_url
from gateway.usage.pricing import Pricing, PricingError, parse_pricing

SEED_MODELS = ("crimson-falcon-4", "indigo-owl-4", "amber-phoenix-4")
DEFAULT_SPOOL_PATH = "liutong-usage.spool"  # in the working directory (/var/lib/liutong in the image)


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names the field."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key defaults; 0 means "no limit" for that dimension."""

    rpm: int = 600
    tpm: int = 200_000
    max_concurrent: int = 32


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `total` bounds non-streaming requests only; streams are bounded by `idle`."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks of a model's upstreams: GET `<root><path>` every `interval` s."""

    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_after: int = 2  # consecutive failed checks that take an upstream out of rotation
    healthy_after: int = 1  # consecutive good checks that bring it back


@dataclass(frozen=True, slots=True)
class CallerJwt:
    """A short-lived JWT the gateway signs for each request to a model's upstreams, in `header`:
    who is calling (key_id, org, model, request_id) without the `lt_` key (see `upstream/caller_jwt.py`)."""

    algorithm: str
    secret: str | None = field(default=None, repr=False)  # HS*
    private_key: str | None = field(default=None, repr=False)  # PEM, RS* / PS* / ES*
    header: str = "x-liutong-caller"
    ttl: float = 60.0
    issuer: str = "liutong-gateway"
    audience: str | None = None  # None: the model id
    key_id: str | None = None  # sent as the token's `kid`


ROUTING_POLICIES = ("prefix_affinity", "least_outstanding", "round_robin")


@dataclass(frozen=True, slots=True)
class PrefixAffinity:
    """How `prefix_affinity` weighs a prompt's cached prefix against load (see `upstream/policies.py`
    and the README's "Routing"). Every price is in prompt tokens: the prefill a cached block saves
    is 16 tokens, and one unit of load costs the tokens below."""

    max_blocks: int = 128  # blocks of a prompt hashed (16 words each): the first 2,048 words
    index_blocks: int = 16_384  # block ids remembered per upstream (LRU; ~124 bytes each, 2 MiB)
    waiting_tokens: float = 512.0  # per request waiting on the server (scraped)
    running_tokens: float = 16.0  # per request running on the server (scraped)
    kv_tokens: float = 512.0  # at a full KV cache (scraped usage 1.0), in proportion below
    inflight_tokens: float = 128.0  # per request in flight from this replica (local load)
    load_bound: float = 1.5  # an upstream over this × the mean in-flight per weight gets no affinity; 0: off


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    upstreams: tuple[str, ...]
    timeouts: Timeouts
    # Sent upstream as `Authorization: Bearer …` when set (the client's own header never is).
    api_key: str | None = None
    weights: tuple[int, ...] = ()  # per upstream, default 1
    max_connections: tuple[int, ...] = ()  # requests in flight per upstream, default 0 = no limit
    health_check: HealthCheck | None = None
    caller_jwt: CallerJwt | None = None
    routing: str = "prefix_affinity"  # one of ROUTING_POLICIES
    prefix_affinity: PrefixAffinity = field(default_factory=PrefixAffinity)
    metrics_path: str | None = None  # the servers' Prometheus page, scraped for their own load
    load_poll_interval: float = 0.5


JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                  "ES256", "ES384", "ES512")  # fmt: skip


@dataclass(frozen=True, slots=True)
class AdminJwt:
    """How admin API bearer tokens are verified (CONTRACT §9): HMAC with `secret`, a PEM public
    key, or the keys at `jwks_url`. `exp` and `aud` are always required, `iss` when `issuer` is set."""

    audience: str
    algorithms: tuple[str, ...]
    secret: str | None = field(default=None, repr=False)
    public_key: str | None = None  # PEM text (from `public_key_file` or given inline)
    jwks_url: str | None = None
    issuer: str | None = None
    role_claim: str = "role"  # a dotted path into the claims, e.g. `realm_access.roles`
    admin_role: str = "admin"
    viewer_role: str = "viewer"
    leeway: float = 30.0  # seconds of clock skew allowed on exp / nbf / iat
    jwks_cache_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class Admin:
    jwt: AdminJwt | None = None  # None: the admin API is off and every /admin/ route answers 404
    rotation_overlap: float = 3600.0  # seconds a rotated key's predecessor keeps working


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Listen = field(default_factory=Listen)
    admin_listen: Listen | None = None
    admin: Admin = field(default_factory=Admin)
    redis_url: str | None = None
    models: Mapping[str, ModelRoute] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_body_bytes: int = 8 * 1024 * 1024
    # `fail_closed`: 503 while the store is unreachable. `fail_open`: serve keys from the local
    # cache and enforce a per-replica share of each limit.
    store_outage_policy: str = "fail_closed"
    fail_open_share: float = 0.25
    store_timeout: float = 0.5
    store_max_connections: int = 64
    key_cache_ttl: float = 2.0
    # Keys validated this recently still authenticate while the store is unreachable.
    key_cache_stale_ttl: float = 600.0
    # Completion tokens reserved against tpm when a request has no `max_tokens`.
    default_max_tokens: int = 1024
    # A concurrency slot whose holder vanished (process killed) expires after this long.
    concurrency_lease_seconds: float = 900.0
    drain_grace_seconds: float = 30.0
    # Further upstreams tried when one refuses the connection or answers 503 (before the first byte).
    upstream_retries: int = 2
    # Seconds a client may take to send its request body (a slow sender gets 408 and is closed).
    request_body_timeout: float = 30.0
    # Seconds an idle client keep-alive connection stays open.
    keepalive_timeout: float = 75.0
    # Forward a request while its limits are checked, when the store's last answer leaves ample
    # room (see `limits/buckets.py`); off: every request waits for the store before it is forwarded.
    admission_overlap: bool = True
    # Seconds from a connection's start, or from the first byte of a request on a keep-alive
    # connection, to the end of the request's headers (a slow sender gets 408 and is closed).
    request_header_timeout: float = 10.0
    # The longest request line or header field (name and value), in bytes, and the most header
    # fields a request may have (a request over either gets 431); aiohttp's defaults.
    max_header_bytes: int = 8190
    max_headers: int = 128
    log_level: str = "info"
    # Usage records wait in this append-only file while the store is unreachable (relative to
    # the working directory; None or "off": in memory only, lost on exit). See `usage/spool.py`.
    # The config file and LIUTONG_* default it to DEFAULT_SPOOL_PATH; settings built in code
    # (tests) have none, so that no test adopts a spool another test left in the directory.
    usage_spool_path: str | None = None
    # `always` (fsync every append), `interval` (every `usage_spool_fsync_interval` s), `never`.
    usage_spool_fsync: str = "interval"
    usage_spool_fsync_interval: float = 1.0
    # Retention of the usage stream: about this many newest records are kept (0 = all).
    usage_stream_maxlen: int = 10_000_000
    # Demo mode: no models configured → serve the seed models from the built-in mock upstream.
    demo: bool = False
    # Prices per model (`pricing:`), in integer micro-units; see `usage/pricing.py`.
    pricing: Pricing = field(default_factory=Pricing)


# --- parsing helpers: each one names the field it reads -------------------------------------


def _int(value: Any, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if number < minimum:
        raise ConfigError(f"{name}: must be ≥ {minimum}, got {number}")
    return number


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _float(value: Any, name: str, *, positive: bool = True) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if number != number or (positive and number <= 0) or number < 0:
        raise ConfigError(f"{name}: must be a positive number, got {value!r}")
    return number


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
    return value


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    return value


def _known(section: Mapping[str, Any], allowed: set[str], name: str) -> None:
    for key in section:
        if key not in allowed:
            where = f"{name}.{key}" if name else str(key)
            raise ConfigError(f"{where}: unknown setting")


def _listen(raw: Any, name: str, default: Listen) -> Listen:
    section = _mapping(raw, name)
    _known(section, {"host", "port"}, name)
    host = _str(section.get("host", default.host), f"{name}.host")
    port = _int(section.get("port", default.port), f"{name}.port")
    if port > 65535:
        raise ConfigError(f"{name}.port: must be ≤ 65535, got {port}")
    return Listen(host=host, port=port)


def _limits(raw: Any, name: str, default: Limits) -> Limits:
    section = _mapping(raw, name)
    _known(section, {"rpm", "tpm", "max_concurrent"}, name)
    return Limits(
        rpm=_int(section.get("rpm", default.rpm), f"{name}.rpm"),
        tpm=_int(section.get("tpm", default.tpm), f"{name}.tpm"),
        max_concurrent=_int(section.get("max_concurrent", default.max_concurrent), f"{name}.max_concurrent"),
    )


def _timeouts(raw: Any, name: str, default: Timeouts) -> Timeouts:
    section = _mapping(raw, name)
    _known(section, {"connect", "first_byte", "idle", "total"}, name)
    values = {
        key: _float(section.get(key, getattr(default, key)), f"{name}.{key}")
        for key in ("connect", "first_byte", "idle", "total")
    }
    return Timeouts(**values)


def upstream_url(value: Any, name: str) -> str:
    """An upstream is an http(s) server root; the gateway appends `/v1/chat/completions`."""
    url = _str(value, name).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: not an http(s) URL: {value!r}")
    if parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{name}: an upstream is a server root without query or credentials: {value!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{name}: bad port in {value!r}") from None
    return url


def _public_key(pem: str, name: str) -> str:
    """`pem` if it is a PEM public key of a kind JWTs are signed with; the error names `name`."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except ValueError:
        raise ConfigError(f"{name}: not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ConfigError(f"{name}: expected an RSA or EC public key")
    return pem


def _default_algorithms(secret: str | None, public_key: str | None, jwks_url: str | None) -> tuple[str, ...]:
    algorithms: list[str] = ["HS256"] if secret else []
    if public_key:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(public_key.encode())
        if isinstance(key, rsa.RSAPublicKey):
            algorithms.append("RS256")
        else:
            curve = getattr(key, "curve", None)
            algorithms.append({"secp384r1": "ES384", "secp521r1": "ES512"}.get(getattr(curve, "name", ""), "ES256"))
    if jwks_url:
        algorithms += [a for a in ("RS256", "ES256") if a not in algorithms]
    return tuple(algorithms)


def _admin_jwt(raw: Any) -> AdminJwt:
    name = "admin.jwt"
    section = _mapping(raw, name)
    _known(section, {"secret", "public_key", "public_key_file", "jwks_url", "algorithms", "audience", "issuer",
                     "role_claim", "admin_role", "viewer_role", "leeway", "jwks_cache_seconds"}, name)  # fmt: skip
    secret = section.get("secret")
    if secret is not None:
        secret = _str(secret, f"{name}.secret")
        if len(secret.encode()) < 32:
            raise ConfigError(f"{name}.secret: must be at least 32 bytes (an HMAC key shorter than its hash is weak)")
    public_key = section.get("public_key")
    key_file = section.get("public_key_file")
    if public_key is not None and key_file is not None:
        raise ConfigError(f"{name}.public_key_file: set either public_key or public_key_file, not both")
    if key_file is not None:
        key_file = _str(key_file, f"{name}.public_key_file")
        try:
            with open(key_file, encoding="utf-8") as fh:
                public_key = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}.public_key_file: cannot read {key_file} ({exc})") from None
        public_key = _public_key(public_key, f"{name}.public_key_file")
    elif public_key is not None:
        public_key = _public_key(_str(public_key, f"{name}.public_key"), f"{name}.public_key")
    jwks_url = section.get("jwks_url")
    if jwks_url is not None:
        jwks_url = _str(jwks_url, f"{name}.jwks_url")
        if urlsplit(jwks_url).scheme not in ("http", "https") or not urlsplit(jwks_url).hostname:
            raise ConfigError(f"{name}.jwks_url: not an http(s) URL: {jwks_url!r}")
    if not (secret or public_key or jwks_url):
        raise ConfigError(f"{name}: set secret, public_key_file (or public_key) or jwks_url")
    if section.get("audience") is None:
        raise ConfigError(f"{name}.audience: required (every admin token must carry a matching `aud`)")
    raw_algorithms = section.get("algorithms")
    if raw_algorithms is None:
        algorithms = _default_algorithms(secret, public_key, jwks_url)
    else:
        items = raw_algorithms.split(",") if isinstance(raw_algorithms, str) else raw_algorithms
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{name}.algorithms: expected a list such as [HS256] or [RS256, ES256]")
        algorithms = tuple(str(a).strip() for a in items)
        for alg in algorithms:
            if alg not in JWT_ALGORITHMS:
                raise ConfigError(f"{name}.algorithms: {alg!r} is not one of {', '.join(JWT_ALGORITHMS)}")
            if alg.startswith("HS") and not secret:
                raise ConfigError(f"{name}.algorithms: {alg} needs {name}.secret")
            if alg.startswith("HS") and secret and len(secret.encode()) < int(alg[2:]) // 8:
                raise ConfigError(f"{name}.secret: {alg} needs a secret of at least {int(alg[2:]) // 8} bytes")
            if not alg.startswith("HS") and not (public_key or jwks_url):
                raise ConfigError(f"{name}.algorithms: {alg} needs {name}.public_key_file or {name}.jwks_url")
    issuer = section.get("issuer")
    leeway = _float(section.get("leeway", 30.0), f"{name}.leeway", positive=False)
    if leeway > 300:
        raise ConfigError(f"{name}.leeway: at most 300 seconds, got {leeway}")
    return AdminJwt(
        audience=_str(section.get("audience"), f"{name}.audience"),
        algorithms=algorithms,
        secret=secret,
        public_key=public_key,
        jwks_url=jwks_url,
        issuer=_str(issuer, f"{name}.issuer") if issuer is not None else None,
        role_claim=_str(section.get("role_claim", "role"), f"{name}.role_claim"),
        admin_role=_str(section.get("admin_role", "admin"), f"{name}.admin_role"),
        viewer_role=_str(section.get("viewer_role", "viewer"), f"{name}.viewer_role"),
        leeway=leeway,
        jwks_cache_seconds=_float(section.get("jwks_cache_seconds", 300.0), f"{name}.jwks_cache_seconds"),
    )


def _admin(raw: Any) -> Admin:
    section = _mapping(raw, "admin")
    _known(section, {"jwt", "rotation_overlap"}, "admin")
    jwt = section.get("jwt")
    return Admin(
        jwt=_admin_jwt(jwt) if jwt is not None else None,
        rotation_overlap=_float(section.get("rotation_overlap", 3600.0), "admin.rotation_overlap", positive=False),
    )


def _models(raw: Any, default_timeouts: Timeouts) -> dict[str, ModelRoute]:
    section = _mapping(raw, "models")
    routes: dict[str, ModelRoute] = {}
    for model, spec in section.items():
        name = f"models.{model}"
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{name}: a model id must be a non-empty string")
        spec = _mapping(spec, name)
        _known(spec, {"upstreams", "timeouts", "api_key", "health_check", "caller_jwt", "routing", "prefix_affinity",
                      "metrics_path", "load_poll_interval"}, name)  # fmt: skip
        ups = spec.get("upstreams")
        if not isinstance(ups, list) or not ups:
            raise ConfigError(f"{name}.upstreams: expected a non-empty list of URLs")
        urls, weights, limits = [], [], []
        for i, entry in enumerate(ups):
            where = f"{name}.upstreams[{i}]"
            if isinstance(entry, Mapping):  # {url, weight, max_connections}
                _known(entry, {"url", "weight", "max_connections"}, where)
                urls.append(upstream_url(entry.get("url"), f"{where}.url"))
                weights.append(_int(entry.get("weight", 1), f"{where}.weight", minimum=1))
                limits.append(_int(entry.get("max_connections", 0), f"{where}.max_connections"))
            else:
                urls.append(upstream_url(entry, where))
                weights.append(1)
                limits.append(0)
        api_key = spec.get("api_key")
        check = spec.get("health_check")
        routes[model] = ModelRoute(
            name=model,
            upstreams=tuple(urls),
            timeouts=_timeouts(spec.get("timeouts"), f"{name}.timeouts", default_timeouts),
            api_key=_str(api_key, f"{name}.api_key") if api_key is not None else None,
            weights=tuple(weights),
            max_connections=tuple(limits),
            health_check=_health_check(check, f"{name}.health_check") if check is not None else None,
            caller_jwt=_caller_jwt(spec["caller_jwt"], f"{name}.caller_jwt") if spec.get("caller_jwt") else None,
            **_routing(spec, name),
        )
    return routes


def _routing(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`routing`, `prefix_affinity`, `metrics_path` and `load_poll_interval` of one model."""
    routing = spec.get("routing", "prefix_affinity")
    if routing not in ROUTING_POLICIES:
        raise ConfigError(f"{name}.routing: expected one of {', '.join(ROUTING_POLICIES)}, got {routing!r}")
    where = f"{name}.prefix_affinity"
    section = _mapping(spec.get("prefix_affinity"), where)
    default = PrefixAffinity()
    _known(section, {f.name for f in fields(PrefixAffinity)}, where)
    affinity = PrefixAffinity(
        max_blocks=_int(section.get("max_blocks", default.max_blocks), f"{where}.max_blocks", minimum=1),
        index_blocks=_int(section.get("index_blocks", default.index_blocks), f"{where}.index_blocks", minimum=1),
        **{
            key: _float(section.get(key, getattr(default, key)), f"{where}.{key}", positive=False)
            for key in ("waiting_tokens", "running_tokens", "kv_tokens", "inflight_tokens", "load_bound")
        },
    )
    for key in ("waiting_tokens", "running_tokens", "kv_tokens", "inflight_tokens", "load_bound"):
        if getattr(affinity, key) == float("inf"):
            raise ConfigError(f"{where}.{key}: must be a finite number")
    if affinity.max_blocks > 4096:
        raise ConfigError(f"{where}.max_blocks: at most 4096, got {affinity.max_blocks}")
    if 0 < affinity.load_bound < 1:
        raise ConfigError(f"{where}.load_bound: 0 (off) or at least 1, got {affinity.load_bound}")
    metrics_path = spec.get("metrics_path")
    if metrics_path is not None:
        metrics_path = _str(metrics_path, f"{name}.metrics_path")
        if not metrics_path.startswith("/"):
            raise ConfigError(f"{name}.metrics_path: must start with /, got {metrics_path!r}")
    interval = _float(spec.get("load_poll_interval", 0.5), f"{name}.load_poll_interval")
    if interval < 0.05:
        raise ConfigError(f"{name}.load_poll_interval: at least 0.05 s, got {interval}")
    return {"routing": routing, "prefix_affinity": affinity, "metrics_path": metrics_path,
            "load_poll_interval": interval}  # fmt: skip


def _caller_jwt(raw: Any, name: str) -> CallerJwt:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    section = _mapping(raw, name)
    _known(section, {"algorithm", "secret", "private_key", "private_key_file", "header", "ttl", "issuer",
                     "audience", "key_id"}, name)  # fmt: skip
    algorithm = section.get("algorithm", "HS256" if section.get("secret") is not None else "ES256")
    if algorithm not in JWT_ALGORITHMS:
        raise ConfigError(f"{name}.algorithm: {algorithm!r} is not one of {', '.join(JWT_ALGORITHMS)}")
    secret = private_key = None
    if algorithm.startswith("HS"):
        secret = _str(section.get("secret"), f"{name}.secret")
        if len(secret.encode()) < int(algorithm[2:]) // 8:
            raise ConfigError(f"{name}.secret: {algorithm} needs a secret of at least {int(algorithm[2:]) // 8} bytes")
    else:
        private_key = section.get("private_key")
        if section.get("private_key_file") is not None:
            path = _str(section["private_key_file"], f"{name}.private_key_file")
            try:
                with open(path, encoding="utf-8") as fh:
                    private_key = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{name}.private_key_file: cannot read {path} ({exc})") from None
        from_file = section.get("private_key_file") is not None
        field_name = f"{name}.private_key_file" if from_file else f"{name}.private_key"
        private_key = _str(private_key, field_name)
        try:
            key = load_pem_private_key(private_key.encode(), password=None)
        except (ValueError, TypeError):
            raise ConfigError(f"{field_name}: not an unencrypted PEM private key") from None
        wanted = ec.EllipticCurvePrivateKey if algorithm.startswith("ES") else rsa.RSAPrivateKey
        if not isinstance(key, wanted):
            raise ConfigError(f"{field_name}: {algorithm} needs an {'EC' if algorithm.startswith('ES') else 'RSA'} key")
    header = _str(section.get("header", "x-liutong-caller"), f"{name}.header")
    if header.lower() in ("authorization", "host", "content-type", "content-length", "x-request-id"):
        raise ConfigError(f"{name}.header: {header!r} is a header the gateway sets itself")
    ttl = _float(section.get("ttl", 60.0), f"{name}.ttl")
    audience, key_id = section.get("audience"), section.get("key_id")
    return CallerJwt(
        algorithm=algorithm,
        secret=secret,
        private_key=private_key,
        header=header,
        ttl=ttl,
        issuer=_str(section.get("issuer", "liutong-gateway"), f"{name}.issuer"),
        audience=_str(audience, f"{name}.audience") if audience is not None else None,
        key_id=_str(key_id, f"{name}.key_id") if key_id is not None else None,
    )


def _health_check(raw: Any, name: str) -> HealthCheck:
    section = _mapping(raw, name)
    _known(section, {"path", "interval", "timeout", "unhealthy_after", "healthy_after"}, name)
    default = HealthCheck()
    path = _str(section.get("path", default.path), f"{name}.path")
    if not path.startswith("/"):
        raise ConfigError(f"{name}.path: must start with /, got {path!r}")
    return HealthCheck(
        path=path,
        interval=_float(section.get("interval", default.interval), f"{name}.interval"),
        timeout=_float(section.get("timeout", default.timeout), f"{name}.timeout"),
        unhealthy_after=_int(section.get("unhealthy_after", default.unhealthy_after), f"{name}.unhealthy_after",
                             minimum=1),  # fmt: skip
        healthy_after=_int(section.get("healthy_after", default.healthy_after), f"{name}.healthy_after", minimum=1),
    )


_TOP_LEVEL = {
    "listen", "admin_listen", "admin", "redis_url", "models", "limits", "timeouts", "max_body_bytes",
    "store_outage_policy", "fail_open_share", "store_timeout", "store_max_connections",
    "key_cache_ttl", "key_cache_stale_ttl", "default_max_tokens", "concurrency_lease_seconds",
    "drain_grace_seconds", "upstream_retries", "request_body_timeout", "keepalive_timeout",
    "request_header_timeout", "max_header_bytes", "max_headers", "log_level",
    "usage_spool_path", "usage_spool_fsync", "usage_spool_fsync_interval", "usage_stream_maxlen",
    "admission_overlap",
    "pricing",
}  # fmt: skip

# `LIUTONG_<NAME>` → (path in the YAML tree, parser of the string). Documented in the README.
ENV_SETTINGS: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "REDIS_URL": (("redis_url",), str),
    "LISTEN_HOST": (("listen", "host"), str),
    "LISTEN_PORT": (("listen", "port"), str),
    "ADMIN_LISTEN_HOST": (("admin_listen", "host"), str),
    "ADMIN_LISTEN_PORT": (("admin_listen", "port"), str),
    "ADMIN_JWT_SECRET": (("admin", "jwt", "secret"), str),
    "ADMIN_JWT_PUBLIC_KEY": (("admin", "jwt", "public_key"), str),
    "ADMIN_JWT_PUBLIC_KEY_FILE": (("admin", "jwt", "public_key_file"), str),
    "ADMIN_JWT_JWKS_URL": (("admin", "jwt", "jwks_url"), str),
    "ADMIN_JWT_ALGORITHMS": (("admin", "jwt", "algorithms"), str),  # comma-separated
    "ADMIN_JWT_AUDIENCE": (("admin", "jwt", "audience"), str),
    "ADMIN_JWT_ISSUER": (("admin", "jwt", "issuer"), str),
    "ADMIN_JWT_ROLE_CLAIM": (("admin", "jwt", "role_claim"), str),
    "ADMIN_JWT_ADMIN_ROLE": (("admin", "jwt", "admin_role"), str),
    "ADMIN_JWT_VIEWER_ROLE": (("admin", "jwt", "viewer_role"), str),
    "ADMIN_JWT_LEEWAY": (("admin", "jwt", "leeway"), str),
    "ADMIN_JWT_JWKS_CACHE_SECONDS": (("admin", "jwt", "jwks_cache_seconds"), str),
    "ADMIN_ROTATION_OVERLAP": (("admin", "rotation_overlap"), str),
    "LIMITS_DEFAULT_RPM": (("limits", "default", "rpm"), str),
    "LIMITS_DEFAULT_TPM": (("limits", "default", "tpm"), str),
    "LIMITS_DEFAULT_MAX_CONCURRENT": (("limits", "default", "max_concurrent"), str),
    "TIMEOUTS_CONNECT": (("timeouts", "connect"), str),
    "TIMEOUTS_FIRST_BYTE": (("timeouts", "first_byte"), str),
    "TIMEOUTS_IDLE": (("timeouts", "idle"), str),
    "TIMEOUTS_TOTAL": (("timeouts", "total"), str),
    "MAX_BODY_BYTES": (("max_body_bytes",), str),
    "STORE_OUTAGE_POLICY": (("store_outage_policy",), str),
    "FAIL_OPEN_SHARE": (("fail_open_share",), str),
    "STORE_TIMEOUT": (("store_timeout",), str),
    "STORE_MAX_CONNECTIONS": (("store_max_connections",), str),
    "KEY_CACHE_TTL": (("key_cache_ttl",), str),
    "KEY_CACHE_STALE_TTL": (("key_cache_stale_ttl",), str),
    "DEFAULT_MAX_TOKENS": (("default_max_tokens",), str),
    "CONCURRENCY_LEASE_SECONDS": (("concurrency_lease_seconds",), str),
    "DRAIN_GRACE_SECONDS": (("drain_grace_seconds",), str),
    "UPSTREAM_RETRIES": (("upstream_retries",), str),
    "REQUEST_BODY_TIMEOUT": (("request_body_timeout",), str),
    "KEEPALIVE_TIMEOUT": (("keepalive_timeout",), str),
    "REQUEST_HEADER_TIMEOUT": (("request_header_timeout",), str),
    "MAX_HEADER_BYTES": (("max_header_bytes",), str),
    "MAX_HEADERS": (("max_headers",), str),
    "LOG_LEVEL": (("log_level",), str),
    "USAGE_SPOOL_PATH": (("usage_spool_path",), str),
    "USAGE_SPOOL_FSYNC": (("usage_spool_fsync",), str),
    "USAGE_SPOOL_FSYNC_INTERVAL": (("usage_spool_fsync_interval",), str),
    "USAGE_STREAM_MAXLEN": (("usage_stream_maxlen",), str),
    "ADMISSION_OVERLAP": (("admission_overlap",), str),
    # The whole `models` section as YAML/JSON, e.g. '{"m": {"upstreams": ["http://u:9001"]}}'.
    "MODELS": (("models",), yaml.safe_load),
}


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return raw


def _apply_env(tree: dict[str, Any], env: Mapping[str, str]) -> None:
    for suffix, (path, parse) in ENV_SETTINGS.items():
        value = env.get(f"LIUTONG_{suffix}")
        if value is None or value == "":
            continue
        try:
            parsed = parse(value)
        except yaml.YAMLError:
            raise ConfigError(f"LIUTONG_{suffix}: not valid YAML/JSON") from None
        node = tree
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[path[-1]] = parsed


def parse_settings(tree: Mapping[str, Any]) -> Settings:
    """Turn a parsed YAML tree (file + environment) into validated `Settings`."""
    _known(tree, _TOP_LEVEL, "")
    defaults = Settings()
    timeouts = _timeouts(tree.get("timeouts"), "timeouts", defaults.timeouts)
    limits_section = _mapping(tree.get("limits"), "limits")
    _known(limits_section, {"default"}, "limits")
    redis_url = tree.get("redis_url")
    if redis_url is not None:
        redis_url = _str(redis_url, "redis_url")
        try:
            parse_redis_url(redis_url)  # one server, a Cluster or Sentinel: see store/topology.py
        except ValueError as exc:
            raise ConfigError(f"redis_url: {exc}") from None
    policy = tree.get("store_outage_policy", defaults.store_outage_policy)
    if policy not in ("fail_closed", "fail_open"):
        raise ConfigError(f"store_outage_policy: expected fail_closed or fail_open, got {policy!r}")
    share = _float(tree.get("fail_open_share", defaults.fail_open_share), "fail_open_share")
    if share > 1:
        raise ConfigError(f"fail_open_share: must be in (0, 1], got {share}")
    log_level = str(tree.get("log_level", defaults.log_level)).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {log_level!r}")
    admin = tree.get("admin_listen")
    spool_path = tree.get("usage_spool_path", DEFAULT_SPOOL_PATH)
    if spool_path is not None:
        spool_path = _str(spool_path, "usage_spool_path")
    fsync = tree.get("usage_spool_fsync", defaults.usage_spool_fsync)
    if fsync not in ("always", "interval", "never"):
        raise ConfigError(f"usage_spool_fsync: expected always, interval or never, got {fsync!r}")
    return Settings(
        listen=_listen(tree.get("listen"), "listen", defaults.listen),
        admin_listen=_listen(admin, "admin_listen", Listen(port=8081)) if admin is not None else None,
        admin=_admin(tree.get("admin")),
        redis_url=redis_url,
        models=_models(tree.get("models"), timeouts),
        limits=_limits(limits_section.get("default"), "limits.default", defaults.limits),
        timeouts=timeouts,
        max_body_bytes=_int(tree.get("max_body_bytes", defaults.max_body_bytes), "max_body_bytes", minimum=1),
        store_outage_policy=policy,
        fail_open_share=share,
        store_timeout=_float(tree.get("store_timeout", defaults.store_timeout), "store_timeout"),
        store_max_connections=_int(
            tree.get("store_max_connections", defaults.store_max_connections), "store_max_connections", minimum=1
        ),
        key_cache_ttl=_float(tree.get("key_cache_ttl", defaults.key_cache_ttl), "key_cache_ttl"),
        key_cache_stale_ttl=_float(
            tree.get("key_cache_stale_ttl", defaults.key_cache_stale_ttl), "key_cache_stale_ttl"
        ),
        default_max_tokens=_int(
            tree.get("default_max_tokens", defaults.default_max_tokens), "default_max_tokens", minimum=1
        ),
        concurrency_lease_seconds=_float(
            tree.get("concurrency_lease_seconds", defaults.concurrency_lease_seconds), "concurrency_lease_seconds"
        ),
        drain_grace_seconds=_float(
            tree.get("drain_grace_seconds", defaults.drain_grace_seconds), "drain_grace_seconds", positive=False
        ),
        upstream_retries=_int(tree.get("upstream_retries", defaults.upstream_retries), "upstream_retries"),
        request_body_timeout=_float(
            tree.get("request_body_timeout", defaults.request_body_timeout), "request_body_timeout"
        ),
        keepalive_timeout=_float(tree.get("keepalive_timeout", defaults.keepalive_timeout), "keepalive_timeout"),
        request_header_timeout=_float(
            tree.get("request_header_timeout", defaults.request_header_timeout), "request_header_timeout"
        ),
        max_header_bytes=_int(tree.get("max_header_bytes", defaults.max_header_bytes), "max_header_bytes", minimum=256),
        max_headers=_int(tree.get("max_headers", defaults.max_headers), "max_headers", minimum=8),
        log_level=log_level,
        usage_spool_path=None if spool_path in (None, "off") else spool_path,
        usage_spool_fsync=fsync,
        usage_spool_fsync_interval=_float(
            tree.get("usage_spool_fsync_interval", defaults.usage_spool_fsync_interval), "usage_spool_fsync_interval"
        ),
        usage_stream_maxlen=_int(tree.get("usage_stream_maxlen", defaults.usage_stream_maxlen), "usage_stream_maxlen"),
        admission_overlap=_flag(tree.get("admission_overlap", defaults.admission_overlap), "admission_overlap"),
        pricing=_pricing(tree.get("pricing")),
    )


def _pricing(raw: Any) -> Pricing:
    try:
        return parse_pricing(raw)
    except PricingError as exc:
        raise ConfigError(str(exc)) from None


def load_settings(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the config file (`path`, else `LIUTONG_CONFIG`, else none) and apply `LIUTONG_*`."""
    env = os.environ if env is None else env
    path = path or env.get("LIUTONG_CONFIG") or None
    tree = _read_file(path) if path else {}
    _apply_env(tree, env)
    return parse_settings(tree)


def with_demo_upstream(settings: Settings, upstream: str) -> Settings:
    """The seed models, all served by the built-in mock upstream at `upstream`."""
    routes = {m: ModelRoute(name=m, upstreams=(upstream,), timeouts=settings.timeouts) for m in SEED_MODELS}
    return replace(settings, models=routes, demo=True)
