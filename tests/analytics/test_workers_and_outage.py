"""Rollups through gunicorn with two workers on PostgreSQL: exact across workers, and across a database
outage whose requests are journaled and replayed (own PostgreSQL, stopped and started again)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from llm_backend.db import migrate
from llm_backend.db.session import make_engine
from tests.analytics.support import assert_rollups_match, raw_rows
from tests.conftest import gunicorn_server
from tests.conftest_db import NO_POSTGRES, TEST_DATABASE_URL, create_pg_database, drop_pg_database
from tests.e2e_access.private_services import private_postgres
from tests.e2e_recording.conftest import wait_for
from tests.e2e_recording.test_durability import Load
from tests.e2e_recording.test_faults import env_for


def _recorded(url: str, ids: set[str]) -> bool:
    engine = make_engine(url)
    try:
        return ids <= {r["client_request_id"] for r in raw_rows(engine)}
    finally:
        engine.dispose()


def _check(url: str, answered: set[str]) -> None:
    engine = make_engine(url)
    try:
        rows = raw_rows(engine)
        ids = [r["client_request_id"] for r in rows]
        assert len(ids) == len(set(ids)), "a request was recorded twice"
        assert answered <= set(ids)
        assert assert_rollups_match(engine) == len(rows)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_two_workers_on_postgresql(tmp_path: Path) -> None:
    if not TEST_DATABASE_URL:
        pytest.skip(NO_POSTGRES)
    url = create_pg_database()
    try:
        migrate.upgrade(url)
        env = env_for(tmp_path, url, tmp_path / "data", workers=2)
        with gunicorn_server(env, tmp_path / "gunicorn.log", timeout=60) as (proc, base):
            with Load(base, threads=6) as load:
                wait_for(lambda: len(load.answered) >= 300, 120, "300 answered requests")
            answered = set(load.answered)
            wait_for(lambda: _recorded(url, answered), 60, "every answered request recorded")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        _check(url, answered)
    finally:
        drop_pg_database(url)


@pytest.mark.fault
def test_rollups_exact_across_a_database_outage_and_replay(tmp_path: Path) -> None:
    with private_postgres() as pg:
        migrate.upgrade(pg.url)
        env = env_for(tmp_path, pg.url, tmp_path / "data", workers=2)
        log = tmp_path / "gunicorn.log"
        with gunicorn_server(env, log, timeout=60) as (proc, base):
            with Load(base, threads=4) as load:
                wait_for(lambda: len(load.answered) >= 60, 120, "60 answered requests")
                pg.stop()  # the recorder spills to its journal meanwhile
                seen = len(load.answered)
                wait_for(lambda: len(load.answered) >= seen + 120, 120, "answers during the outage")
                pg.start()
                seen = len(load.answered)
                wait_for(lambda: len(load.answered) >= seen + 60, 120, "answers after the outage")
            answered = set(load.answered)
            wait_for(lambda: _recorded(pg.url, answered), 120, "the journal replayed")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        _check(pg.url, answered)
