"""Fixtures of these tests: the database fixtures of tests/conftest_db.py (SQLite and PostgreSQL)."""

from tests.conftest_db import backend, db_url, empty_db_url, engine, pg_migrated_url

__all__ = ["backend", "db_url", "empty_db_url", "engine", "pg_migrated_url"]
