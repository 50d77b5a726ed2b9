"""The `liutong-gateway` command line (CONTRACT §5): serve, keys, orgs, usage, mock-upstream.

Every command reads the same settings (`--config`, `--redis-url`, `LIUTONG_*`). Bad arguments
get a short message naming the argument on stderr and exit status 2 (argparse's convention);
a bad config file or an unreachable store exits 1 with the reason. `keys` and `orgs` go through
the same services as the admin API (`KeyService`, `OrgService`), which publish every change so
that running gateways drop their cached entries at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError

from gateway.config import ConfigError, Listen, Settings, load_settings
from gateway.keys.orgs import OrgExists, OrgNotFound, OrgRecord, OrgService, valid_org
from gateway.keys.records import KeyNotFound, KeyRecord, KeyRevoked, KeyService
from gateway.sim import command as sim_command
from gateway.store.client import open_store
from gateway.store.topology import parse_redis_url
from gateway.usage import export as usage_cli

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s` → seconds (argparse type: a bad value exits 2 naming it)."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90m or 45s, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be ≤ 65535, got {value}")
    return value


def redis_url(text: str) -> str:
    try:
        parse_redis_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def model_list(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    if not models:
        raise argparse.ArgumentTypeError("expected comma-separated model ids")
    return models


def overlap(text: str) -> float:
    """A duration, or 0 (revoke the rotated key at once)."""
    return 0.0 if text.strip() == "0" else duration(text)


def org_name(text: str) -> str:
    if not valid_org(text):
        raise argparse.ArgumentTypeError(f"expected 1-64 characters of [A-Za-z0-9._-], got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (default: $LIUTONG_CONFIG)")
    common.add_argument("--redis-url", type=redis_url, help="shared store, e.g. redis://127.0.0.1:6379/0 (default: $LIUTONG_REDIS_URL)")

    parser = argparse.ArgumentParser(prog="liutong-gateway", description="API gateway for LLM model servers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=port)
    serve.add_argument("--workers", type=positive_int, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT); needs redis_url")  # fmt: skip

    mock = commands.add_parser("mock-upstream", help="run a fake Liutong model server")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=port, default=9001)

    sim_command.add_parser(commands)

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    def limit_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--org", type=org_name)
        p.add_argument("--models", type=model_list, help="comma-separated model ids (default: all)")
        p.add_argument("--rpm", type=non_negative_int, help="requests per minute (0 = no limit)")
        p.add_argument("--tpm", type=non_negative_int, help="tokens per minute (0 = no limit)")
        p.add_argument("--max-concurrent", type=non_negative_int, help="requests in flight (0 = no limit)")
        p.add_argument("--expires-in", type=duration, help="e.g. 30d, 12h")

    create = key_commands.add_parser("create", parents=[common], help="create a key (printed once)")
    create.add_argument("--name", required=True)
    limit_options(create)
    create.add_argument("--json", action="store_true")
    listing = key_commands.add_parser("list", parents=[common], help="list keys")
    listing.add_argument("--json", action="store_true")
    show = key_commands.add_parser("show", parents=[common], help="show one key")
    show.add_argument("key_id")
    show.add_argument("--json", action="store_true")
    revoke = key_commands.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("key_id")
    update = key_commands.add_parser("update", parents=[common], help="change a key's limits")
    update.add_argument("key_id")
    update.add_argument("--name")
    limit_options(update)
    update.add_argument("--disable", action="store_true")
    update.add_argument("--enable", action="store_true")
    update.add_argument("--json", action="store_true")
    rotate = key_commands.add_parser("rotate", parents=[common], help="replace a key (new key printed once)")
    rotate.add_argument("key_id")
    rotate.add_argument("--overlap", type=overlap, help="how long the old key still works, e.g. 1h "
                        "(default: admin.rotation_overlap; 0 = revoke it now)")  # fmt: skip
    rotate.add_argument("--json", action="store_true")

    orgs = commands.add_parser("orgs", help="manage org-wide limits")
    org_commands = orgs.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("create", "create an org"), ("update", "change an org's limits")):
        p = org_commands.add_parser(action, parents=[common], help=text)
        p.add_argument("org", type=org_name)
        p.add_argument("--rpm", type=non_negative_int, help="requests per minute for the whole org (0 = no limit)")
        p.add_argument("--tpm", type=non_negative_int, help="tokens per minute for the whole org (0 = no limit)")
        p.add_argument("--json", action="store_true")
    org_show = org_commands.add_parser("show", parents=[common], help="show one org")
    org_show.add_argument("org", type=org_name)
    org_show.add_argument("--json", action="store_true")
    org_list = org_commands.add_parser("list", parents=[common], help="list orgs")
    org_list.add_argument("--json", action="store_true")
    usage_cli.add_parsers(commands, common)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(getattr(args, "config", None))
    if getattr(args, "redis_url", None):
        settings = replace(settings, redis_url=args.redis_url)
    return settings


def _show(record: KeyRecord, as_json: bool, plaintext: str | None = None) -> None:
    data = record.public()
    if plaintext:
        data = {"key": plaintext, **data}
    if as_json:
        print(json.dumps(data, indent=None if plaintext else 2))
        return
    if plaintext:
        print(plaintext)
        print(f"key_id: {record.key_id}  (the key is shown only now; store it safely)", file=sys.stderr)
        return
    for name, value in data.items():
        print(f"{name:15} {_fmt(name, value)}")


def _fmt(name: str, value: Any) -> str:
    if value is None or value == []:
        return "-" if name not in ("models",) else "all"
    if name.endswith("_at") and isinstance(value, float):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print("keys: no store configured; set --redis-url or LIUTONG_REDIS_URL (the embedded store "
              "lives inside a running gateway only)", file=sys.stderr)  # fmt: skip
        return 2
    store = open_store(settings.redis_url, timeout=max(settings.store_timeout, 2.0))
    service = KeyService(store.redis)
    try:
        if args.action == "create":
            plaintext, record = await service.create(
                args.name, org=args.org, models=args.models or (), rpm=args.rpm, tpm=args.tpm,
                max_concurrent=args.max_concurrent, expires_in=args.expires_in,
            )  # fmt: skip
            _show(record, args.json, plaintext)
        elif args.action == "list":
            records = await service.list()
            if args.json:
                print(json.dumps([r.public() for r in records], indent=2))
            else:
                print(f"{'KEY_ID':18} {'NAME':20} {'ORG':12} {'STATUS':9} {'RPM':>7} {'TPM':>9} {'CONC':>5}  MODELS")
                for r in records:
                    p = r.public()
                    print(f"{r.key_id:18} {r.name[:20]:20} {(r.org or '-')[:12]:12} {p['status']:9} "
                          f"{_fmt('rpm', r.rpm):>7} {_fmt('tpm', r.tpm):>9} {_fmt('c', r.max_concurrent):>5}  "
                          f"{_fmt('models', list(r.models))}")  # fmt: skip
        elif args.action == "show":
            _show(await service.get(args.key_id), args.json)
        elif args.action == "revoke":
            record = await service.revoke(args.key_id)
            print(f"revoked {record.key_id}")
        elif args.action == "rotate":
            seconds = settings.admin.rotation_overlap if args.overlap is None else args.overlap
            plaintext, record, old = await service.rotate(args.key_id, overlap=seconds)
            _show(record, args.json, plaintext)
            if not args.json:
                print(f"{old.key_id} stops working at {_fmt('revoked_at', old.revoked_at)}", file=sys.stderr)
        elif args.action == "update":
            changes: dict[str, Any] = {}
            for name in ("name", "org", "rpm", "tpm", "max_concurrent"):
                if getattr(args, name) is not None:
                    changes[name] = getattr(args, name)
            if args.models is not None:
                changes["models"] = args.models
            if args.expires_in is not None:
                changes["expires_at"] = time.time() + args.expires_in
            if args.disable and args.enable:
                print("keys update: --disable and --enable exclude each other", file=sys.stderr)
                return 2
            if args.disable or args.enable:
                changes["disabled"] = args.disable
            _show(await service.update(args.key_id, **changes), args.json)
    except KeyNotFound as exc:
        print(f"keys {args.action}: no key with key_id {exc.args[0]!r}", file=sys.stderr)
        return 1
    except KeyRevoked as exc:
        print(f"keys {args.action}: key {exc.args[0]!r} is revoked or already rotated", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"keys {args.action}: the store at the configured redis_url is unreachable ({exc})", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


def _show_org(record: OrgRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record.public(), indent=2))
        return
    for name, value in record.public().items():
        print(f"{name:15} {_fmt(name, value)}")


async def _orgs(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print("orgs: no store configured; set --redis-url or LIUTONG_REDIS_URL", file=sys.stderr)
        return 2
    if args.action == "update" and args.rpm is None and args.tpm is None:
        print("orgs update: give --rpm and/or --tpm", file=sys.stderr)
        return 2
    store = open_store(settings.redis_url, timeout=max(settings.store_timeout, 2.0))
    service = OrgService(store.redis)
    try:
        if args.action == "create":
            _show_org(await service.create(args.org, rpm=args.rpm, tpm=args.tpm), args.json)
        elif args.action == "update":
            changes = {name: getattr(args, name) for name in ("rpm", "tpm") if getattr(args, name) is not None}
            _show_org(await service.update(args.org, **changes), args.json)
        elif args.action == "show":
            _show_org(await service.get(args.org), args.json)
        elif args.action == "list":
            records = await service.list()
            if args.json:
                print(json.dumps([r.public() for r in records], indent=2))
            else:
                print(f"{'ORG':24} {'RPM':>9} {'TPM':>11}")
                for r in records:
                    print(f"{r.org[:24]:24} {_fmt('rpm', r.rpm):>9} {_fmt('tpm', r.tpm):>11}")
    except OrgExists:
        print(f"orgs create: org {args.org!r} exists already (change it with `orgs update`)", file=sys.stderr)
        return 1
    except OrgNotFound:
        print(f"orgs {args.action}: no org {args.org!r}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"orgs {args.action}: the store at the configured redis_url is unreachable ({exc})", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


def _without_workers(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "mock-upstream":
        from gateway.mock.server import run_mock_upstream

        run_mock_upstream(args.host, args.port)
        return 0
    if args.command == "sim-upstream":
        return sim_command.run(args)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"liutong-gateway: bad configuration: {exc}", file=sys.stderr)
        return 1
    if args.command == "serve":
        from gateway.server import serve

        def with_flags(loaded: Settings) -> Settings:
            if args.host or args.port is not None:
                listen = Listen(host=args.host or loaded.listen.host,
                                port=loaded.listen.port if args.port is None else args.port)  # fmt: skip
                loaded = replace(loaded, listen=listen)
            return loaded

        settings = with_flags(settings)
        if args.workers > 1:
            from gateway.server import supervise

            if not settings.redis_url:
                print("liutong-gateway: --workers needs a shared store (redis_url): workers on the embedded "
                      "store would each keep their own keys and limits", file=sys.stderr)  # fmt: skip
                return 2
            return supervise(_without_workers(sys.argv[1:] if argv is None else list(argv)), args.workers)
        return serve(settings, reload=lambda: with_flags(_settings(args)))
    runner: dict[str, Callable[[argparse.Namespace, Settings], Awaitable[int]]] = {"keys": _keys, "orgs": _orgs, "usage": usage_cli.run}
    return asyncio.run(runner[args.command](args, settings))


if __name__ == "__main__":
    sys.exit(main())
