"""A writing transaction on SQLite takes the write lock as it begins, so it queues behind other writers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from llm_backend.db.session import make_engine, session_scope


def _try_write_lock(path: Path) -> None:
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_a_write_scope_holds_the_write_lock_from_its_first_statement(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with session_scope(engine) as session:
            session.execute(sa.text("SELECT 1"))
            _try_write_lock(path)  # a reading scope leaves the write lock free
        with session_scope(engine, write=True) as session:
            session.execute(sa.text("SELECT 1"))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                _try_write_lock(path)
        _try_write_lock(path)  # released with the transaction
    finally:
        engine.dispose()
