"""Pricing fixtures: the recording fixtures (SQLite and, with TEST_DATABASE_URL, PostgreSQL) reused."""

from __future__ import annotations

from tests.conftest_db import backend, db_url, pg_migrated_url
from tests.e2e_recording.conftest import app_for, settings_for

__all__ = ["app_for", "backend", "db_url", "pg_migrated_url", "settings_for"]
