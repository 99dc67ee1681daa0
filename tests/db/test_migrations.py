"""Alembic: upgrade from empty to head, downgrade to base, models match migrations, schema status, prune."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from llm_backend.db import migrate, schema
from llm_backend.db.models import Base, Conversation, RequestLog
from llm_backend.db.session import make_engine, session_scope

TABLES = {
    "request_log",
    "conversations",
    "messages",
    "api_keys",
    "response_owners",
    "usage_hourly",
    "usage_daily",
    "usage_callers_daily",
    "usage_facets_hourly",
    "usage_facets_daily",
    "console_sessions",
    "teams",
    "users",
    "team_members",
    "console_sessions",
}


def _tables(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_then_downgrade(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        assert _tables(engine) == set()
        migrate.upgrade(empty_db_url)
        assert _tables(engine) == TABLES
        assert migrate.current_revision(engine) == migrate.head_revision()
        indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("request_log")}
        assert {
            "ix_request_log_created_at",
            "ix_request_log_key_id_created_at",
            "ix_request_log_model_created_at",
            "ix_request_log_conversation_id",
        } <= indexes
        migrate.downgrade(empty_db_url, "base")
        assert _tables(engine) == set()
        assert migrate.current_revision(engine) is None
        migrate.upgrade(engine)  # again, through an engine, to prove downgrade left nothing behind
        assert _tables(engine) == TABLES
    finally:
        engine.dispose()


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_schema_status(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        ok, message = migrate.schema_status(engine)
        assert not ok
        assert "llm-backend migrate" in message and "make migrate" in message
        assert migrate.head_revision() in message
        migrate.upgrade(empty_db_url)
        ok, message = migrate.schema_status(engine)
        assert ok, message
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
        ok, message = migrate.schema_status(engine)
        assert not ok
        assert "ffffffffffff" in message and "does not know" in message
    finally:
        engine.dispose()


def test_schema_status_behind_names_both_revisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'behind.db'}"
    migrate.upgrade(url, "0001")
    engine = make_engine(url)
    monkeypatch.setattr(schema, "head_revision", lambda: "0002")
    ok, message = migrate.schema_status(engine)
    engine.dispose()
    assert not ok
    assert message == (
        "database schema is at 0001, code expects 0002: run `make migrate` (or `llm-backend migrate`)"
    )


def test_file_parsed_head_matches_alembic() -> None:
    """Readiness reads the head from the migration files without Alembic; it must agree with Alembic."""
    assert schema.head_revision() == migrate.head_revision()
    assert schema.revisions()["0001"] == ()  # the initial revision follows nothing


def test_schema_status_unreachable_database() -> None:
    engine = make_engine("postgresql://postgres@127.0.0.1:1/none")
    ok, message = migrate.schema_status(engine)
    engine.dispose()
    assert not ok and message.startswith("database unreachable")


def test_migrations_found_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert migrate.find_alembic_ini().parent == Path(migrate.__file__).resolve().parents[2]
    migrate.upgrade(f"sqlite:///{tmp_path / 'cwd.db'}")
    assert os.path.exists(tmp_path / "cwd.db")


def test_parse_duration() -> None:
    assert migrate.parse_duration("90d") == timedelta(days=90)
    assert migrate.parse_duration("12h") == timedelta(hours=12)
    assert migrate.parse_duration("2w") == timedelta(weeks=2)
    assert migrate.parse_duration("30") == timedelta(days=30)
    with pytest.raises(ValueError):
        migrate.parse_duration("soon")


def _log_row(request_id: str, created_at: datetime) -> RequestLog:
    return RequestLog(
        request_id=request_id,
        created_at=created_at,
        route="/v1/chat/completions",
        operation="chat",
        status_code=200,
        outcome="ok",
        stream=False,
        attempts=1,
        prompt_tokens=1,
        completion_tokens=1,
        total_tokens=2,
        tokens_estimated=False,
        latency_ms=1.0,
    )


def test_prune(engine: Engine) -> None:
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        for i in range(7):
            session.add(_log_row(f"old-{i}", now - timedelta(days=100 + i)))
        for i in range(3):
            session.add(_log_row(f"new-{i}", now - timedelta(days=i)))
        session.add(
            Conversation(
                id="c-old", created_at=now - timedelta(days=200), updated_at=now - timedelta(days=200)
            )
        )
        session.add(Conversation(id="c-new", created_at=now, updated_at=now))
    assert migrate.prune(engine, timedelta(days=90), batch_size=3) == 7
    with session_scope(engine) as session:
        left = set(session.scalars(sa.select(RequestLog.request_id)))
        assert left == {"new-0", "new-1", "new-2"}
        assert set(session.scalars(sa.select(Conversation.id))) == {"c-old", "c-new"}
    assert migrate.prune(engine, timedelta(days=90), include_conversations=True) == 1
    with session_scope(engine) as session:
        assert set(session.scalars(sa.select(Conversation.id))) == {"c-new"}
    with pytest.raises(ValueError):
        migrate.prune(engine, timedelta(0))
