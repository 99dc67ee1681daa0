"""Engine factory: URL normalisation, SQLite pragmas and savepoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from llm_backend.db.session import DEFAULT_DATABASE_URL, database_url, make_engine, normalize_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///./x.db", "sqlite:///./x.db"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


def test_database_url_default_and_env() -> None:
    assert database_url({}) == DEFAULT_DATABASE_URL == "sqlite:///./llm_backend.db"
    assert database_url({"DATABASE_URL": "postgres://h/db"}) == "postgresql+psycopg://h/db"


def test_make_engine_postgres_uses_psycopg() -> None:
    engine = make_engine("postgres://postgres@127.0.0.1:1/nothing")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()


def test_sqlite_savepoint_rolls_back_only_inner(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        nested = conn.begin_nested()
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        nested.rollback()
        conn.exec_driver_sql("INSERT INTO t VALUES (3)")
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(sa.text("SELECT x FROM t ORDER BY x"))] == [1, 3]
    engine.dispose()


def test_sqlite_engine_usable_from_other_threads(tmp_path: Path) -> None:
    import threading

    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    results: list[int] = []

    def work() -> None:
        with engine.connect() as conn:
            results.append(conn.execute(sa.text("SELECT 1")).scalar_one())

    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [1]
    engine.dispose()
