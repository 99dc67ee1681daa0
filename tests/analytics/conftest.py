"""Analytics fixtures: the shared database fixtures (SQLite, and PostgreSQL when TEST_DATABASE_URL is set)."""

from tests.conftest_db import backend, db_url, empty_db_url, engine, pg_migrated_url

__all__ = ["backend", "db_url", "empty_db_url", "engine", "pg_migrated_url"]

from tests.e2e_recording.conftest import app_for, fake_azure, settings_for

__all__ += ["app_for", "fake_azure", "settings_for"]
