"""Database fixtures shared by tests/db and tests/recording: a migrated SQLite file or PostgreSQL database."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from llm_backend.db import migrate
from llm_backend.db.models import Base
from llm_backend.db.session import make_engine, normalize_url

logger = logging.getLogger(__name__)

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
NO_POSTGRES = (
    "PostgreSQL variant: set TEST_DATABASE_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"
)
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _admin_engine() -> Engine:
    assert TEST_DATABASE_URL
    url = make_url(normalize_url(TEST_DATABASE_URL)).set(database="postgres")
    return sa.create_engine(url, isolation_level="AUTOCOMMIT")


def create_pg_database() -> str:
    """A new, empty PostgreSQL database on the TEST_DATABASE_URL server; returns its URL."""
    name = f"llmb_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    assert TEST_DATABASE_URL
    url = make_url(normalize_url(TEST_DATABASE_URL)).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    name = make_url(url).database
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def pg_migrated_url() -> Iterator[str]:
    """One PostgreSQL database per test session, migrated to head; dropped at the end."""
    if not TEST_DATABASE_URL:
        pytest.skip(NO_POSTGRES)
    url = create_pg_database()
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


def _truncate_all(url: str) -> None:
    engine = make_engine(url)
    try:
        names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {names} CASCADE")
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database migrated to head and empty: a tmp SQLite file, or the session's PostgreSQL db."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        migrate.upgrade(url)
        yield url
    else:
        url = request.getfixturevalue("pg_migrated_url")
        _truncate_all(url)
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def backend(db_url: str) -> str:
    """ "sqlite" or "postgresql": which variant this test runs on."""
    return make_url(db_url).get_backend_name()


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (never migrated): a tmp SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    if not TEST_DATABASE_URL:
        pytest.skip(NO_POSTGRES)
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)
