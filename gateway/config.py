"""Settings: frozen dataclasses with their defaults, read from one YAML file and `LIUTONG_*`.

`load_settings(path, env)` is the only reader. The environment is passed in as a mapping (tests
give their own) and wins over the file. Every bad value raises `ConfigError` naming its field,
so that the process refuses to start with a message an operator can act on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import yaml

SEED_MODELS = ("crimson-falcon-4", "indigo-owl-4", "amber-phoenix-4")


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
class ModelRoute:
    name: str
    upstreams: tuple[str, ...]
    timeouts: Timeouts
    # Sent upstream as `Authorization: Bearer …` when set (the client's own header never is).
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Listen = field(default_factory=Listen)
    admin_listen: Listen | None = None
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
    log_level: str = "info"
    # Demo mode: no models configured → serve the seed models from the built-in mock upstream.
    demo: bool = False


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


def _models(raw: Any, default_timeouts: Timeouts) -> dict[str, ModelRoute]:
    section = _mapping(raw, "models")
    routes: dict[str, ModelRoute] = {}
    for model, spec in section.items():
        name = f"models.{model}"
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{name}: a model id must be a non-empty string")
        spec = _mapping(spec, name)
        _known(spec, {"upstreams", "timeouts", "api_key"}, name)
        ups = spec.get("upstreams")
        if not isinstance(ups, list) or not ups:
            raise ConfigError(f"{name}.upstreams: expected a non-empty list of URLs")
        api_key = spec.get("api_key")
        routes[model] = ModelRoute(
            name=model,
            upstreams=tuple(upstream_url(u, f"{name}.upstreams[{i}]") for i, u in enumerate(ups)),
            timeouts=_timeouts(spec.get("timeouts"), f"{name}.timeouts", default_timeouts),
            api_key=_str(api_key, f"{name}.api_key") if api_key is not None else None,
        )
    return routes


_TOP_LEVEL = {
    "listen", "admin_listen", "redis_url", "models", "limits", "timeouts", "max_body_bytes",
    "store_outage_policy", "fail_open_share", "store_timeout", "store_max_connections",
    "key_cache_ttl", "key_cache_stale_ttl", "default_max_tokens", "concurrency_lease_seconds",
    "drain_grace_seconds", "log_level",
}  # fmt: skip

# `LIUTONG_<NAME>` → (path in the YAML tree, parser of the string). Documented in the README.
ENV_SETTINGS: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "REDIS_URL": (("redis_url",), str),
    "LISTEN_HOST": (("listen", "host"), str),
    "LISTEN_PORT": (("listen", "port"), str),
    "ADMIN_LISTEN_HOST": (("admin_listen", "host"), str),
    "ADMIN_LISTEN_PORT": (("admin_listen", "port"), str),
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
    "LOG_LEVEL": (("log_level",), str),
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
        if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis_url: expected redis://, rediss:// or unix://, got {redis_url!r}")
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
    return Settings(
        listen=_listen(tree.get("listen"), "listen", defaults.listen),
        admin_listen=_listen(admin, "admin_listen", Listen(port=8081)) if admin is not None else None,
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
        log_level=log_level,
    )


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
