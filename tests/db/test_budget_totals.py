"""The request log's token totals of a key per UTC day and month (what lost budget counters are seeded from),
and the engine's timeouts, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db.repositories import RequestLogRepository, key_token_totals
from llm_backend.db.session import DatabaseUnavailable, make_engine, session_scope
from tests.db.test_repositories import log_row

DAY = datetime(2025, 3, 14, tzinfo=UTC)
MONTH = datetime(2025, 3, 1, tzinfo=UTC)


def test_totals_of_the_day_and_the_month(engine: Engine) -> None:
    rows = [
        log_row("a", created_at=DAY + timedelta(hours=1), total_tokens=10),
        log_row("b", created_at=DAY + timedelta(hours=23, minutes=59), total_tokens=20),
        log_row("c", created_at=DAY - timedelta(seconds=1), total_tokens=100),  # yesterday, this month
        log_row("d", created_at=MONTH - timedelta(seconds=1), total_tokens=1000),  # last month
        log_row("e", created_at=DAY + timedelta(hours=2), total_tokens=5, key_id="other"),
        log_row("f", created_at=DAY + timedelta(hours=3), total_tokens=0, status_code=429, outcome="error"),
    ]
    with session_scope(engine) as session:
        RequestLogRepository(session).insert_ignore(rows)
    with session_scope(engine) as session:
        assert key_token_totals(session, "key_a", DAY, MONTH) == (30, 130)
        assert key_token_totals(session, "nobody", DAY, MONTH) == (0, 0)
        # the first day of a month: both windows start together
        assert key_token_totals(session, "key_a", MONTH, MONTH) == (1130 - 1000, 130)


def test_sqlite_busy_timeout_follows_the_statement_timeout(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}", statement_timeout_s=2.5)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    engine.dispose()


def test_postgres_statement_timeout_is_a_database_outage(db_url: str, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("PostgreSQL statement_timeout")
    engine = make_engine(db_url, statement_timeout_s=0.5, connect_timeout_s=2, pool_timeout_s=2)
    try:
        with session_scope(engine) as session:
            assert session.execute(sa.text("SHOW statement_timeout")).scalar() == "500ms"
        with pytest.raises(DatabaseUnavailable) as info, session_scope(engine) as session:
            session.execute(sa.text("SELECT pg_sleep(3)"))
        assert "statement timeout" in str(info.value)
    finally:
        engine.dispose()


def test_unreachable_database_is_database_unavailable() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/x", connect_timeout_s=2)
    try:
        with pytest.raises(DatabaseUnavailable), session_scope(engine) as session:
            session.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def test_other_errors_pass_unchanged(engine: Engine) -> None:
    with pytest.raises(sa.exc.DBAPIError) as info, session_scope(engine) as session:
        session.execute(sa.text("SELECT * FROM no_such_table"))
    assert not isinstance(info.value, DatabaseUnavailable)  # a bug is a 500 with its traceback, not a 503
