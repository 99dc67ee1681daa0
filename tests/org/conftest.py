"""Fixtures of the teams-and-users tests: those of the limiter tests and of the access end-to-end tests."""

from __future__ import annotations

from tests.e2e_access.conftest import (  # noqa: F401 - fixtures
    _clean_redis_state,
    _patient_redis_limiter,
    db_url,
    http,
    limiter_redis_url,
    make_app,
    pg_migrated_url,
    serve,
    sqlite_url,
)
from tests.limits.conftest import harness, redis_prefix, redis_url  # noqa: F401 - fixtures
