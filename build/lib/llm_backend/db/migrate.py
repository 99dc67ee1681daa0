"""Programmatic Alembic (upgrade, downgrade, schema status for readiness) and retention pruning."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from llm_backend.db.base import utcnow
from llm_backend.db.models import Conversation, RequestLog
from llm_backend.db.schema import MIGRATE_HINT, parse_duration
from llm_backend.db.schema import schema_status as _schema_status

__all__ = [
    "MIGRATE_HINT",
    "alembic_config",
    "current_revision",
    "downgrade",
    "find_alembic_ini",
    "head_revision",
    "parse_duration",
    "prune",
    "schema_status",
    "upgrade",
]
from llm_backend.db.session import make_engine, normalize_url

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def find_alembic_ini() -> Path:
    """alembic.ini of the repository that holds this package (then the working directory), not cwd-bound."""
    for root in (_PACKAGE_ROOT, Path.cwd()):
        ini = root / "alembic.ini"
        if ini.is_file() and (root / "migrations" / "env.py").is_file():
            return ini
    raise FileNotFoundError(f"alembic.ini with migrations/ not found under {_PACKAGE_ROOT} or {Path.cwd()}")


def alembic_config(url: str | None = None, *, engine: Engine | None = None) -> Config:
    """An Alembic Config with absolute paths; the URL (or an engine's connection) goes in as attributes."""
    ini = find_alembic_ini()
    cfg = Config(str(ini))
    cfg.set_main_option("script_location", str(ini.parent / "migrations"))
    cfg.attributes["skip_logging_config"] = True
    if url:
        cfg.attributes["url"] = normalize_url(url)
    if engine is not None:
        cfg.attributes["url"] = engine.url.render_as_string(hide_password=False)
    return cfg


def head_revision() -> str:
    """The revision the code expects (the single head of migrations/versions)."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"expected one migration head, found {heads}")
    return heads[0]


def _run(url_or_engine: str | Engine, action: str, rev: str) -> None:
    engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(engine=engine)
            cfg.attributes["connection"] = conn
            getattr(command, action)(cfg, rev)
    finally:
        if not isinstance(url_or_engine, Engine):
            engine.dispose()


def upgrade(url: str | Engine, rev: str = "head") -> None:
    """Upgrade the database at `url` (or through an engine) to `rev`."""
    logger.info("upgrading database schema to %s", rev)
    _run(url, "upgrade", rev)


def downgrade(url: str | Engine, rev: str = "base") -> None:
    """Downgrade the database at `url` (or through an engine) to `rev`."""
    logger.info("downgrading database schema to %s", rev)
    _run(url, "downgrade", rev)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_status(engine: Engine) -> tuple[bool, str]:
    """(ok, message): whether the database schema is at the code's head revision, and what to do if not."""
    return _schema_status(engine)


def prune(
    engine: Engine,
    older_than: timedelta,
    *,
    include_conversations: bool = False,
    batch_size: int = 10_000,
    rollups_older_than: timedelta | None = None,
) -> int:
    """Delete request_log rows created before now - `older_than` (in batches); returns rows deleted.

    With `include_conversations`, conversations not updated since then go too (their messages cascade)
    and are counted in the result. The usage rollups are kept (reports over pruned days still add up);
    with `rollups_older_than`, rollup buckets older than that go too (counted in the result).
    """
    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    if rollups_older_than is not None and rollups_older_than <= timedelta(0):
        raise ValueError("rollups_older_than must be positive")
    cutoff = utcnow() - older_than
    targets: list[tuple[Any, Any, Any]] = [
        (RequestLog.request_id, RequestLog.created_at < cutoff, RequestLog.__table__)
    ]
    if include_conversations:
        targets.append((Conversation.id, Conversation.updated_at < cutoff, Conversation.__table__))
    deleted = 0
    for key, condition, table in targets:
        while True:
            ids = sa.select(key).where(condition).limit(batch_size).scalar_subquery()
            with engine.begin() as conn:
                result = conn.execute(sa.delete(table).where(key.in_(ids)))
            count = result.rowcount or 0
            deleted += count
            if count < batch_size:
                break
    if rollups_older_than is not None:
        from llm_backend.db.repositories import RollupRepository
        from llm_backend.db.session import session_scope

        with session_scope(engine, write=True) as session:
            deleted += RollupRepository(session).prune(utcnow() - rollups_older_than)
    logger.info("pruned %d rows older than %s", deleted, cutoff.isoformat())
    return deleted
