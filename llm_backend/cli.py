"""The `llm-backend` command: serve, migrate, keys, usage, prune, rollups, check-config."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_backend.config import ConfigError, Settings
from llm_backend.logs import report_config_error

DEFAULT_DATABASE_URL = "sqlite:///./llm_backend.db"
EXIT_FAILED = 1  # the command could not do its work (database unreachable, schema behind, unknown key)
EXIT_USAGE = 2  # the input is wrong (configuration, arguments)
EXIT_PIPE = 141  # stdout was closed early (`| head`), as a shell reports a process killed by SIGPIPE


class CliError(Exception):
    """A failure the user can act on: one line saying what is wrong and what to do."""


def _db_url() -> str:
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: mask by hand
        if "@" not in url or "://" not in url:
            return url
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def _scrub(text: str, url: str) -> str:
    """`text` without the URL's password, should a driver's message ever quote it."""
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(str(password), "***") if password else text


def _which_database(url: str) -> str:
    if os.environ.get("DATABASE_URL"):
        return f"the database {_safe_url(url)} (DATABASE_URL)"
    return f"the local database {url.removeprefix('sqlite:///')} (DATABASE_URL is not set)"


def _explain_database_error(exc: BaseException, url: str) -> str:
    """A SQLAlchemy/driver error as one line: what is wrong and what to do."""
    from sqlalchemy import exc as sa_exc

    orig = getattr(exc, "orig", None)
    detail = str(orig if orig is not None else exc).strip().splitlines()
    first = _scrub(detail[0].strip() if detail else type(exc).__name__, url)
    where = _which_database(url)
    lowered = first.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"{where} has no llm-backend schema ({first}); run `llm-backend migrate` first"
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        if url.startswith("sqlite"):
            return (
                f"cannot open {where} ({first}); check that DATABASE_URL names a file in a directory "
                "that exists and is writable"
            )
        return (
            f"cannot connect to {where} ({first}); check DATABASE_URL and that the database server is running"
        )
    return f"database error on {where}: {first}"


def _check_schema(engine: Any, url: str) -> None:
    """Raise CliError unless the database is at the revision this code expects."""
    from llm_backend.db.schema import current_revision, head_revision, revisions

    current = current_revision(engine)
    expected = head_revision()
    where = _which_database(url)
    if current == expected:
        return
    if current is None:
        raise CliError(f"{where} is not set up yet (no schema): run `llm-backend migrate` first")
    if current not in revisions():
        raise CliError(
            f"{where} is at schema revision {current}, which this llm-backend does not know (it expects "
            f"{expected}): the database was migrated by a newer release; upgrade llm-backend"
        )
    raise CliError(
        f"{where} is at schema revision {current}, this llm-backend expects {expected}: run `llm-backend migrate`"
    )


def _sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL (None for other databases, in-memory ones and URLs that do not parse)."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return str(parsed.database)


@contextlib.contextmanager
def _database(*, schema: bool = True) -> Iterator[Any]:
    """An engine for DATABASE_URL; with `schema`, only once the schema is current. Database failures
    inside the block become one-line CliErrors."""
    from sqlalchemy import exc as sa_exc

    from llm_backend.db.session import make_engine, normalize_url

    url = normalize_url(_db_url())
    sqlite_file = _sqlite_file(url)
    if schema and sqlite_file and not Path(sqlite_file).exists():
        # connecting would leave an empty file behind in the wrong directory
        raise CliError(
            f"{_which_database(url)} does not exist: run `llm-backend migrate` first (or set DATABASE_URL)"
        )
    try:
        engine = make_engine(url)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ValueError) as exc:
        raise CliError(
            f"DATABASE_URL {_safe_url(url)!r} is not a database URL llm-backend can use ({_scrub(str(exc), url)}); "
            "use e.g. postgresql+psycopg://user:password@host:5432/db or sqlite:///./llm_backend.db"
        ) from None
    except ImportError as exc:
        raise CliError(
            f"DATABASE_URL {_safe_url(url)} needs a database driver that is not installed ({exc}); "
            "llm-backend supports postgresql+psycopg:// and sqlite://"
        ) from None
    try:
        if schema:
            _check_schema(engine, url)
        yield engine
    except sa_exc.SQLAlchemyError as exc:
        raise CliError(_explain_database_error(exc, url)) from None
    finally:
        engine.dispose()


# -- output ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A value as a table shows it: lists comma-joined, times in ISO to the second, nothing as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "-"
    if isinstance(value, datetime):
        value = value.isoformat()
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        if when.tzinfo is not None:
            when = when.astimezone(UTC)
            return when.replace(microsecond=0, tzinfo=None).isoformat() + "Z"
        return when.replace(microsecond=0).isoformat()
    return str(value)


def _print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    headers: Mapping[str, str] | None = None,
    empty: str = "(none)",
) -> None:
    """Rows as aligned columns (numbers right-aligned) under a header line."""
    if not rows:
        print(empty)
        return
    heads = [(headers or {}).get(c, c) for c in columns]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    numeric = [
        any(number(r.get(c)) for r in rows) and all(r.get(c) is None or number(r.get(c)) for r in rows)
        for c in columns
    ]
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(heads)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    print(line(heads))
    for row in cells:
        print(line(row))


def _with_period(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns, and the budget-period ones when some row has a period budget (a plain list reads as
    before)."""
    extra = [
        c
        for c in ("period_tokens", "period_spend", "period_start", "period_end")
        if any(r.get(c) is not None for r in rows)
    ]
    return [*columns, *extra] if any(r.get("period_end") for r in rows) else list(columns)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, default=str))


# -- commands ---------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    conf = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
    argv = ["gunicorn", "llm_backend.asgi:app"]
    if conf.exists():
        argv[1:1] = ["-c", str(conf)]
    else:
        argv += ["-k", "llm_backend.server.Worker", "--bind", f"{args.host}:{args.port}"]
    if args.host:
        os.environ["HOST"] = args.host
    if args.port:
        os.environ["PORT"] = str(args.port)
    if args.workers:
        os.environ["WEB_CONCURRENCY"] = str(args.workers)
    Settings.from_env()  # fail fast, one line per problem, before gunicorn forks
    os.execvp(argv[0], argv)


def cmd_migrate(args: argparse.Namespace) -> int:
    from llm_backend.db.migrate import downgrade, upgrade
    from llm_backend.db.schema import current_revision

    with _database(schema=False) as engine:
        if args.downgrade:
            downgrade(engine, args.downgrade)
        else:
            upgrade(engine, "head")
        print(f"database {_safe_url(_db_url())} is at revision {current_revision(engine) or 'base'}")
    return 0


def _model_summary(settings: Settings) -> list[dict[str, Any]]:
    """The models and their backends as check-config shows them; never a key or a header value."""
    out = []
    for m in settings.models:
        backends = []
        for b in m.backends:
            target = b.endpoint or b.base_url
            backends.append(
                {
                    "name": b.name,
                    "provider": b.provider,
                    "target": f"{target}/{b.deployment}" if b.deployment and target else target,
                    "auth": b.auth if b.provider == "azure" else None,
                    "priority": b.priority,
                }
            )
        summary: dict[str, Any] = {
            "name": m.name,
            "aliases": list(m.aliases),
            "strategy": m.strategy,
            "backends": backends,
        }
        if m.context_window is not None:
            summary["context_window"] = m.context_window
        if m.max_output_tokens is not None:
            summary["max_output_tokens"] = m.max_output_tokens
        if m.prices is not None:
            summary["prices"] = {
                "input": m.prices.input,
                "cached_input": m.prices.cached_input,
                "output": m.prices.output,
            }
        out.append(summary)
    return out


def _prices_cell(model: Mapping[str, Any]) -> str | None:
    """`2.5/1.25/10` (input/cached input/output per million tokens) for check-config's table."""
    prices = model.get("prices")
    if not prices:
        return None
    return "/".join(f"{prices[k]:g}" for k in ("input", "cached_input", "output"))


def cmd_check_config(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.file:
        env["LLM_BACKEND_CONFIG"] = args.file
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        source = env.get("LLM_BACKEND_CONFIG") or "the environment"
        if args.json:
            _print_json({"source": source, "valid": False, "errors": list(exc.problems)})
            return EXIT_USAGE
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"llm-backend: {count} error{'s' * (count != 1)} in {source}", file=sys.stderr)
        return EXIT_USAGE
    models = _model_summary(settings)
    if args.json:
        _print_json({"source": settings.config_source, "valid": True, "models": models})
        return 0
    rows = [
        {
            "model": m["name"],
            "aliases": m["aliases"],
            "strategy": m["strategy"],
            **b,
            "context_window": m.get("context_window"),
            "max_output_tokens": m.get("max_output_tokens"),
            "prices": _prices_cell(m),
        }
        for m in models
        for b in m["backends"]
    ]
    columns = ["model", "aliases", "strategy", "name", "provider", "target"]
    # the metadata columns only when some model declares them, so that a plain file reads as before
    columns += [
        c for c in ("context_window", "max_output_tokens", "prices") if any(r[c] is not None for r in rows)
    ]
    _print_table(
        rows,
        columns,
        headers={
            "name": "backend",
            "context_window": "context",
            "max_output_tokens": "max_output",
            "prices": "per 1M in/cached/out",
        },
    )
    backends = sum(len(m["backends"]) for m in models)
    print(
        f"{settings.config_source}: valid; {len(models)} model{'s' * (len(models) != 1)}, "
        f"{backends} backend{'s' * (backends != 1)}"
    )
    return 0


_KEY_COLUMNS = [
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
]


def cmd_keys(args: argparse.Namespace) -> int:
    from llm_backend.errors import GatewayError
    from llm_backend.services.keys import KeyStore

    with _database() as engine:
        store = KeyStore(engine)
        try:
            return _keys(args, store)
        except GatewayError as exc:
            raise CliError(exc.message) from None


def _keys(args: argparse.Namespace, store: Any) -> int:
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
        if args.team:
            data["team"] = args.team
        if args.user:
            data["user"] = args.user
        if args.trusted_ui:
            data["trusted_ui"] = True
        _period_data(args, data)
        info, secret = store.create(data)
        if args.json:
            _print_json({**info, "secret": secret})
        else:
            print(f"created key {info['id']} ({info['name']}); store it now, it is not shown again:")
            print(secret)
    elif args.keys_command == "list":
        keys = store.list(args.owner)
        if args.json:
            _print_json(keys)
        else:
            for key in keys:
                key["models"] = key.get("models") or "all"
            _print_table(
                keys,
                _with_period([*_KEY_COLUMNS, "last_used_at"], keys),
                empty="no keys yet: llm-backend keys create --name NAME",
            )
    elif args.keys_command == "update":
        changes: dict[str, Any] = {}
        _given(args, changes, ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens"))
        _period_data(args, changes)
        if not changes:
            raise CliError("nothing to change: give a limit flag (see keys update --help)")
        info = store.update(args.key_id, changes)
        if args.json:
            _print_json(info)
        else:
            print(f"updated key {info['id']} ({info['name']})")
    elif args.keys_command in ("disable", "enable"):
        info = store.update(args.key_id, {"enabled": args.keys_command == "enable"})
        print(f"{args.keys_command}d key {info['id']} ({info['name']})")
    elif args.keys_command == "delete":
        store.delete(args.key_id)
        print(f"deleted key {args.key_id}")
    return 0


_USAGE_TOTALS = ["requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "estimated"]


class _Money(float):
    """A cost as the usage table shows it: six decimals (a millionth of the currency), more only for a
    cost smaller than that; right-aligned like the other numbers."""

    def __str__(self) -> str:
        shown = f"{self:.6f}"
        if float(self) != 0 and shown.lstrip("-") == "0.000000":
            shown = f"{self:.12f}".rstrip("0")
        return shown


def _key_id(engine: Any, id_or_name: str) -> str:
    """A key given by its id or by its name (which must then be unambiguous)."""
    from llm_backend.services.keys import KeyStore

    keys = KeyStore(engine).list()
    if any(k["id"] == id_or_name for k in keys):
        return id_or_name
    named = [k["id"] for k in keys if k["name"] == id_or_name]
    if len(named) == 1:
        return named[0]
    if named:
        raise CliError(f"several keys are named {id_or_name!r} ({', '.join(named)}); give --key the id")
    return id_or_name  # perhaps a deleted key: its rows are still in the request log


def cmd_usage(args: argparse.Namespace) -> int:
    from llm_backend.db.migrate import parse_duration
    from llm_backend.services.usage import usage_report

    until = datetime.now(UTC)
    since = until - parse_duration(args.since)
    groups = [g.strip() for g in args.group_by.split(",") if g.strip()]
    with _database() as engine:
        key_id = _key_id(engine, args.key) if args.key else None
        team_id = user_id = None
        if args.team or args.user:
            from llm_backend.errors import GatewayError
            from llm_backend.services.org import OrgStore

            org = OrgStore(engine)
            try:
                team_id = org.team_id(args.team) if args.team else None
                user_id = org.user_id(args.user) if args.user else None
            except GatewayError as exc:
                raise CliError(exc.message) from None
        try:
            rows = usage_report(
                engine, since, until, groups, key_id, args.model, user_id=user_id, team_id=team_id
            )
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        if row.get("key_id") and "key_name" in row and row["key_name"] is None:
            row["key_name"] = "(deleted)"
        if row.get("cost") is not None:
            row["cost"] = _Money(row["cost"])
    columns: list[str] = []
    for g in groups:
        columns += {"key": ["key_id", "key_name"], "team": ["team_id", "team_name"]}.get(
            g, ["user_id", "user_email"] if g == "user_id" else [g]
        )
    _print_table(
        rows,
        [*columns, *_USAGE_TOTALS, "cost"],
        empty=f"no requests since {_cell(since)}",
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from llm_backend.db.migrate import parse_duration, prune

    older_than = parse_duration(args.older_than)
    rollups = parse_duration(args.rollups_older_than) if args.rollups_older_than else None
    if rollups is not None and rollups < older_than:
        raise CliError(
            "--rollups-older-than must not be shorter than --older-than (rollups outlive raw rows)"
        )
    with _database() as engine:
        deleted = prune(
            engine, older_than, include_conversations=args.conversations, rollups_older_than=rollups
        )
    kept = f"; rollups older than {args.rollups_older_than} too" if rollups else "; usage rollups kept"
    print(f"deleted {deleted} rows older than {args.older_than}{kept}")
    return 0


def cmd_rollups(args: argparse.Namespace) -> int:
    from llm_backend.db.migrate import parse_duration
    from llm_backend.db.repositories import RollupRepository
    from llm_backend.db.session import session_scope

    since = datetime.now(UTC) - parse_duration(args.since) if args.since else None
    with _database() as engine, session_scope(engine, write=True) as session:
        covered = RollupRepository(session).rebuild(since=since, keep_pruned=not args.all)
    span = f"since {_cell(since)} (whole UTC days)" if since else "every day"
    if not args.all:
        span += " after the oldest request's day"
    print(f"rebuilt usage rollups for {span} from the request log: {covered} requests")
    return 0


_TEAM_COLUMNS = [
    "id",
    "name",
    "members",
    "models",
    "rpm",
    "tpm",
    "daily_tokens",
    "daily_spend",
    "monthly_spend",
    "groups",
]
_USER_COLUMNS = [
    "id",
    "email",
    "name",
    "enabled",
    "teams",
    "rpm",
    "daily_tokens",
    "daily_spend",
    "last_seen_at",
]
_ORG_INTS = ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens")


def _limit(text: str) -> int:
    """A whole-number limit; `none` (or a negative number) clears it (-1)."""
    if text.strip().lower() == "none":
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or `none`: {text!r}") from None


def _limit_flags(p: argparse.ArgumentParser) -> None:
    """The limit flags of teams and users, named like the keys' (--daily-spend/--monthly-spend: money)."""
    p.add_argument("--models", action="append", help="allowed models (comma list; repeatable); default all")
    p.add_argument("--rpm", type=_limit, metavar="N")
    p.add_argument("--tpm", type=_limit, metavar="N")
    p.add_argument("--max-parallel", dest="max_parallel", type=_limit, metavar="N")
    p.add_argument("--daily-tokens", dest="daily_tokens", type=_limit, metavar="N")
    p.add_argument("--monthly-tokens", dest="monthly_tokens", type=_limit, metavar="N")
    p.add_argument("--daily-spend", dest="daily_spend", metavar="AMOUNT", help="money per UTC day")
    p.add_argument("--monthly-spend", dest="monthly_spend", metavar="AMOUNT", help="money per UTC month")
    _period_flags(p)


def _period_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a budget for a fixed period (keys, teams, users); `none` clears one."""
    p.add_argument(
        "--period-tokens", dest="period_tokens", type=_limit, metavar="N", help="tokens for the period"
    )
    p.add_argument("--period-spend", dest="period_spend", metavar="AMOUNT", help="money for the period")
    p.add_argument(
        "--period-start",
        dest="period_start",
        metavar="WHEN",
        help="ISO 8601 date or time the period starts (a date: 00:00 UTC); default: now",
    )
    p.add_argument(
        "--period-end",
        dest="period_end",
        metavar="WHEN",
        help="ISO 8601 date or time the period ends (exclusive); needed by a period budget",
    )


def _given(
    args: argparse.Namespace, data: dict[str, Any], numbers: Sequence[str] = (), texts: Sequence[str] = ()
) -> None:
    """Put the flags given into `data`: a negative number or the word `none` clears a limit (None)."""
    for field in numbers:
        value = getattr(args, field)
        if value is not None:
            data[field] = None if value < 0 else value
    for field in texts:
        value = getattr(args, field)
        if value is not None:
            data[field] = None if value.strip().lower() == "none" else value


def _period_data(args: argparse.Namespace, data: dict[str, Any]) -> None:
    _given(args, data, ("period_tokens",), ("period_spend", "period_start", "period_end"))


def _limit_data(args: argparse.Namespace) -> dict[str, Any]:
    """The limits given on the command line; the word `none` clears one (unlimited)."""
    data: dict[str, Any] = {}
    if args.models:
        joined = ",".join(args.models)
        data["models"] = None if joined.strip().lower() in ("all", "*") else _csv(joined)
    _given(args, data, _ORG_INTS, ("daily_spend", "monthly_spend"))
    _period_data(args, data)
    return data


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_teams(args: argparse.Namespace) -> int:
    from llm_backend.errors import GatewayError
    from llm_backend.services.org import OrgStore

    with _database() as engine:
        store = OrgStore(engine)
        try:
            return _teams(args, store)
        except GatewayError as exc:
            raise CliError(exc.message) from None


def _teams(args: argparse.Namespace, store: Any) -> int:
    action = args.teams_command
    if action in ("create", "update"):
        data = _limit_data(args)
        if args.name is not None:
            data["name"] = args.name
        if args.groups is not None:
            data["groups"] = _csv(args.groups) or None
        info = store.create_team(data) if action == "create" else store.update_team(args.team, data)
        if args.json:
            _print_json(info)
        else:
            print(f"{action}d team {info['id']} ({info['name']})")
    elif action == "list":
        teams = store.list_teams()
        if args.json:
            _print_json(teams)
        else:
            for team in teams:
                team["models"] = team.get("models") or "all"
            _print_table(
                teams,
                _with_period(_TEAM_COLUMNS, teams),
                empty="no teams yet: llm-backend teams create --name NAME",
            )
    elif action == "show":
        _print_json(store.get_team(args.team))
    elif action == "delete":
        deleted = store.delete_team(args.team)
        print(f"deleted team {deleted}")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from llm_backend.errors import GatewayError
    from llm_backend.services.org import OrgStore

    with _database() as engine:
        store = OrgStore(engine)
        try:
            return _users(args, store)
        except GatewayError as exc:
            raise CliError(exc.message) from None


def _users(args: argparse.Namespace, store: Any) -> int:
    action = args.users_command
    if action == "list":
        users = store.list_users(args.team, args.q)
        if args.json:
            _print_json(users)
        else:
            for user in users:
                user["teams"] = ",".join(
                    f"{t['name']}{'*' if t['role'] == 'admin' else ''}" for t in user["teams"]
                )
            _print_table(
                users,
                _with_period(_USER_COLUMNS, users),
                empty="no users yet: they appear when they first sign in",
            )
    elif action == "show":
        _print_json(store.get_user(args.user))
    elif action == "update":
        data = _limit_data(args)
        if args.teams is not None:
            data["teams"] = _csv(args.teams)
        if args.admin_of is not None:
            data["admin_of"] = _csv(args.admin_of)
        if args.enable or args.disable:
            data["enabled"] = bool(args.enable)
        info = store.update_user(args.user, data)
        if args.json:
            _print_json(info)
        else:
            print(f"updated user {info['id']} ({info['email'] or info['subject']})")
    return 0


def _org_parsers(sub: Any) -> None:
    teams = sub.add_parser("teams", help="manage teams: their models, limits, budgets and OIDC groups")
    ts = teams.add_subparsers(dest="teams_command", required=True, metavar="ACTION")
    c = ts.add_parser("create", help="create a team")
    c.add_argument("--name", required=True)
    _limit_flags(c)
    c.add_argument("--groups", metavar="G1,G2", help="OIDC groups whose members belong to the team")
    c.add_argument("--json", action="store_true", help="print the team as JSON")
    u = ts.add_parser("update", help="change a team (a negative number or `none` clears a limit)")
    u.add_argument("team", metavar="TEAM", help="id or name")
    u.add_argument("--name")
    _limit_flags(u)
    u.add_argument("--groups", metavar="G1,G2", help="OIDC groups ('' clears them)")
    u.add_argument("--json", action="store_true", help="print the team as JSON")
    ls = ts.add_parser("list", help="list teams")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    for name in ("show", "delete"):
        d = ts.add_parser(name, help=f"{name} a team")
        d.add_argument("team", metavar="TEAM", help="id or name")
    teams.set_defaults(func=cmd_teams)

    users = sub.add_parser("users", help="list and edit users (they are created when they first sign in)")
    us = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    ls = us.add_parser("list", help="list users")
    ls.add_argument("--team", help="only this team's members (id or name)")
    ls.add_argument("--q", help="search emails and names")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    s = us.add_parser("show", help="show a user")
    s.add_argument("user", metavar="USER", help="id, email or subject")
    u = us.add_parser("update", help="change a user's limits, teams or enabled flag")
    u.add_argument("user", metavar="USER", help="id, email or subject")
    _limit_flags(u)
    u.add_argument("--teams", metavar="T1,T2", help="the teams an admin assigns (replaces the assigned ones)")
    u.add_argument("--admin-of", dest="admin_of", metavar="T1,T2", help="the teams the user administers")
    on = u.add_mutually_exclusive_group()
    on.add_argument("--enable", action="store_true")
    on.add_argument("--disable", action="store_true")
    u.add_argument("--json", action="store_true", help="print the user as JSON")
    users.set_defaults(func=cmd_users)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-backend",
        description="OpenAI-compatible gateway for Azure OpenAI",
        epilog="The database is DATABASE_URL (default sqlite:///./llm_backend.db); `llm-backend migrate` sets it up.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve with gunicorn and uvicorn workers (gunicorn.conf.py)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="upgrade the database (DATABASE_URL) to the current schema")
    p.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (e.g. base)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "check-config",
        help="validate the models configuration and print it",
        description="Validate FILE (default: LLM_BACKEND_CONFIG, else the environment's models) and the "
        "environment's settings; every problem is listed, one line each. Exit code 2 on problems.",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="models YAML file (default: LLM_BACKEND_CONFIG)")
    p.add_argument("--json", action="store_true", help="print the models as JSON")
    p.set_defaults(func=cmd_check_config)

    keys = sub.add_parser("keys", help="manage API keys")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
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
    c.add_argument(
        "--team", metavar="TEAM", help="the team the key belongs to (id or name): its limits apply too"
    )
    c.add_argument("--user", metavar="USER", help="the user the key belongs to (id or email)")
    c.add_argument(
        "--trusted-ui",
        dest="trusted_ui",
        action="store_true",
        help="a front-end that names its end user per request (TRUSTED_USER_HEADERS)",
    )
    _period_flags(c)
    c.add_argument("--json", action="store_true", help="print the key as JSON, its secret in 'secret'")
    up = ks.add_parser("update", help="change a key's limits (a negative number or `none` clears a limit)")
    up.add_argument("key_id")
    up.add_argument("--rpm", type=_limit, metavar="N")
    up.add_argument("--tpm", type=_limit, metavar="N")
    up.add_argument("--max-parallel", dest="max_parallel", type=_limit, metavar="N")
    up.add_argument("--daily-tokens", dest="daily_tokens", type=_limit, metavar="N")
    up.add_argument("--monthly-tokens", dest="monthly_tokens", type=_limit, metavar="N")
    _period_flags(up)
    up.add_argument("--json", action="store_true", help="print the key as JSON")
    ls = ks.add_parser("list", help="list keys")
    ls.add_argument("--owner")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    for name in ("disable", "enable", "delete"):
        d = ks.add_parser(name, help=f"{name} a key")
        d.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)
    _org_parsers(sub)

    p = sub.add_parser("usage", help="token and request totals (from the usage rollups)")
    p.add_argument("--since", default="30d", help="how far back (e.g. 7d, 24h); default 30d")
    p.add_argument(
        "--group-by",
        default="key,model",
        help="comma list of key, model, day, user (the body's user field), backend, user_id, team",
    )
    p.add_argument("--key", metavar="KEY", help="only this key (its id, or its name)")
    p.add_argument("--team", metavar="TEAM", help="only this team (its id, or its name)")
    p.add_argument("--user", metavar="USER", help="only this user (its id, email or subject)")
    p.add_argument("--model", help="only this model")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("prune", help="delete request-log rows older than a duration")
    p.add_argument("--older-than", required=True, help="e.g. 90d")
    p.add_argument("--conversations", action="store_true", help="also delete conversations idle that long")
    p.add_argument(
        "--rollups-older-than",
        metavar="AGE",
        help="also delete usage rollups older than this (e.g. 400d); default: keep them",
    )
    p.set_defaults(func=cmd_prune)

    rollups = sub.add_parser("rollups", help="the usage rollups that reports and the console read")
    rs = rollups.add_subparsers(dest="rollups_command", required=True, metavar="ACTION")
    r = rs.add_parser(
        "rebuild",
        help="recompute the rollups from the request log",
        description="Recompute the usage rollups from the request log (whole UTC days; all of it by "
        "default). Safe while serving: the recorder's rollup writes wait for it. The day of the oldest "
        "request row and those before it are kept as they are (their raw rows may have been pruned) "
        "unless --all is given.",
    )
    r.add_argument("--since", help="only days from this long ago on (e.g. 7d)")
    r.add_argument(
        "--all",
        action="store_true",
        help="also rebuild the oldest request's day and earlier (only if nothing was ever pruned)",
    )
    rollups.set_defaults(func=cmd_rollups)
    return parser


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush stays silent."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        print("llm-backend: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        report_config_error(exc.problems)
        return EXIT_USAGE
    except CliError as exc:
        print(f"llm-backend: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"llm-backend: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
