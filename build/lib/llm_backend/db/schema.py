"""Schema status without loading Alembic: the migration files' head against the database's version."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.durations import parse_duration

__all__ = [
    "MIGRATE_HINT",
    "current_revision",
    "head_revision",
    "parse_duration",
    "revisions",
    "schema_status",
]

MIGRATE_HINT = "run `make migrate` (or `llm-backend migrate`)"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_ASSIGN = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+)$", re.MULTILINE)


def versions_dir() -> Path:
    for root in (_PACKAGE_ROOT, Path.cwd()):
        path = root / "migrations" / "versions"
        if path.is_dir():
            return path
    raise FileNotFoundError(f"migrations/versions not found under {_PACKAGE_ROOT} or {Path.cwd()}")


@functools.lru_cache(maxsize=1)
def revisions() -> dict[str, tuple[str, ...]]:
    """Every migration revision with the revisions it follows."""
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted(versions_dir().glob("*.py")):
        found = dict(
            (m.group(1), m.group(2).strip()) for m in _ASSIGN.finditer(path.read_text(encoding="utf-8"))
        )
        if "revision" not in found:
            continue
        rev = ast.literal_eval(found["revision"])
        down = ast.literal_eval(found.get("down_revision", "None"))
        out[str(rev)] = (
            tuple(down) if isinstance(down, list | tuple) else (() if down is None else (str(down),))
        )
    return out


def head_revision() -> str:
    """The revision the code expects (the single head of migrations/versions)."""
    revs = revisions()
    followed = {d for downs in revs.values() for d in downs}
    heads = [r for r in revs if r not in followed]
    if len(heads) != 1:
        raise RuntimeError(f"expected one migration head, found {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def schema_status(engine: Engine) -> tuple[bool, str]:
    """(ok, message): whether the database schema is at the code's head revision, and what to do if not."""
    try:
        expected = head_revision()
    except Exception as exc:  # a broken install is a readiness failure, not a crash
        return False, f"cannot read the migrations: {exc}"
    try:
        current = current_revision(engine)
    except Exception as exc:
        return False, f"database unreachable: {type(exc).__name__}: {exc}"
    if current == expected:
        return True, f"database schema is at {current} (head)"
    if current is None:
        return False, f"database schema is not initialised, code expects {expected}: {MIGRATE_HINT}"
    if current not in revisions():
        return False, (
            f"database schema is at {current}, which this code does not know (code expects {expected}): "
            "the database was migrated by a newer release"
        )
    return False, f"database schema is at {current}, code expects {expected}: {MIGRATE_HINT}"
