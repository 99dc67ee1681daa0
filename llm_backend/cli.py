"""The `llm-backend` command: serve, migrate, keys, usage, prune, check-config."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_backend.config import ConfigError, Settings


def _db_url() -> str:
    return os.environ.get("DATABASE_URL") or "sqlite:///./llm_backend.db"


def _engine() -> Any:
    from llm_backend.db.session import make_engine

    return make_engine(_db_url())


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def cmd_serve(args: argparse.Namespace) -> int:
    conf = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
    argv = ["gunicorn", "llm_backend.asgi:app"]
    if conf.exists():
        argv[1:1] = ["-c", str(conf)]
    else:
        argv += ["-k", "uvicorn_worker.UvicornWorker", "--bind", f"{args.host}:{args.port}"]
    if args.host:
        os.environ["HOST"] = args.host
    if args.port:
        os.environ["PORT"] = str(args.port)
    if args.workers:
        os.environ["WEB_CONCURRENCY"] = str(args.workers)
    try:
        Settings.from_env()  # fail fast, in one line, before gunicorn forks
    except ConfigError as exc:
        print(f"llm-backend: configuration error: {exc}", file=sys.stderr)
        return 2
    os.execvp(argv[0], argv)


def cmd_migrate(args: argparse.Namespace) -> int:
    from llm_backend.db.migrate import current_revision, downgrade, upgrade

    url = _db_url()
    if args.downgrade:
        downgrade(url, args.downgrade)
    else:
        upgrade(url, "head")
    engine = _engine()
    try:
        print(f"database {_safe_url(url)} is at revision {current_revision(engine)}")
    finally:
        engine.dispose()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    for m in settings.models:
        names = ", ".join((m.name, *m.aliases))
        backends = "; ".join(f"{b.name} ({b.provider})" for b in m.backends)
        print(f"{names}: {backends}")
    print(f"configuration from {settings.config_source} is valid")
    return 0


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {
        c: max(len(c), *(len(str(r.get(c) if r.get(c) is not None else "-")) for r in rows)) for c in columns
    }
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c]) for c in columns))


def _store() -> Any:
    from llm_backend.services.keys import KeyStore

    return KeyStore(_engine())


def cmd_keys(args: argparse.Namespace) -> int:
    from llm_backend.errors import GatewayError

    store = _store()
    try:
        if args.keys_command == "create":
            data: dict[str, Any] = {"name": args.name}
            if args.owner:
                data["owner"] = args.owner
            if args.models:
                data["models"] = [m.strip() for m in ",".join(args.models).split(",") if m.strip()]
            for field in ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens"):
                value = getattr(args, field)
                if value is not None:
                    data[field] = value
            if args.expires:
                data["expires_in"] = args.expires
            if args.allow_ip:
                data["allowed_ips"] = args.allow_ip
            info, secret = store.create(data)
            print(f"created key {info['id']} ({info['name']}); store it now, it is not shown again:")
            print(secret)
        elif args.keys_command == "list":
            _print_table(
                store.list(args.owner),
                [
                    "id",
                    "name",
                    "owner",
                    "prefix",
                    "enabled",
                    "models",
                    "rpm",
                    "tpm",
                    "daily_tokens",
                    "expires_at",
                ],
            )
        elif args.keys_command == "disable":
            info = store.update(args.key_id, {"enabled": False})
            print(f"disabled key {info['id']} ({info['name']})")
        elif args.keys_command == "enable":
            info = store.update(args.key_id, {"enabled": True})
            print(f"enabled key {info['id']} ({info['name']})")
        elif args.keys_command == "delete":
            store.delete(args.key_id)
            print(f"deleted key {args.key_id}")
    except GatewayError as exc:
        print(f"llm-backend keys: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.engine.dispose()
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from llm_backend.db.migrate import parse_duration
    from llm_backend.services.usage import usage_report

    until = datetime.now(UTC)
    since = until - parse_duration(args.since)
    groups = [g.strip() for g in args.group_by.split(",") if g.strip()]
    engine = _engine()
    try:
        rows = usage_report(engine, since, until, groups, args.key, args.model)
    finally:
        engine.dispose()
    key_of = {"key": "key_id"}
    columns = [key_of.get(g, g) for g in groups] + [
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "estimated",
    ]
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, columns)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from llm_backend.db.migrate import parse_duration, prune

    engine = _engine()
    try:
        deleted = prune(engine, parse_duration(args.older_than), include_conversations=args.conversations)
    finally:
        engine.dispose()
    print(f"deleted {deleted} rows older than {args.older_than}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-backend", description="OpenAI-compatible gateway for Azure OpenAI"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve with gunicorn and uvicorn workers (gunicorn.conf.py)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="upgrade the database (DATABASE_URL) to the current schema")
    p.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (e.g. base)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("check-config", help="validate the models configuration and print it")
    p.set_defaults(func=cmd_check_config)

    keys = sub.add_parser("keys", help="manage API keys")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create a key; prints it as the last line")
    c.add_argument("--name", required=True)
    c.add_argument("--owner")
    c.add_argument("--models", action="append", help="allowed models (comma list; repeatable); default all")
    c.add_argument("--rpm", type=int)
    c.add_argument("--tpm", type=int)
    c.add_argument("--max-parallel", dest="max_parallel", type=int)
    c.add_argument("--daily-tokens", dest="daily_tokens", type=int)
    c.add_argument("--monthly-tokens", dest="monthly_tokens", type=int)
    c.add_argument("--expires", help="lifetime such as 30d, 12h")
    c.add_argument("--allow-ip", action="append", help="allowed client CIDR range (repeatable)")
    ls = ks.add_parser("list", help="list keys")
    ls.add_argument("--owner")
    for name in ("disable", "enable", "delete"):
        d = ks.add_parser(name, help=f"{name} a key")
        d.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)

    p = sub.add_parser("usage", help="token and request totals from the request log")
    p.add_argument("--since", default="30d", help="how far back (e.g. 7d, 24h); default 30d")
    p.add_argument("--group-by", default="key,model", help="comma list of key, model, day, user, backend")
    p.add_argument("--key", help="only this key id")
    p.add_argument("--model", help="only this model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("prune", help="delete request-log rows older than a duration")
    p.add_argument("--older-than", required=True, help="e.g. 90d")
    p.add_argument("--conversations", action="store_true", help="also delete conversations idle that long")
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"llm-backend: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"llm-backend: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
