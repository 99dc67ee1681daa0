"""PostgreSQL stopped (outage) and SIGSTOPped (hang) under gunicorn with keys on: cached keys keep working,
an unknown key gets an OpenAI-shaped 503 with Retry-After, no request waits beyond the timeouts, and the
log has a line per interval, not one per request."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_backend.db import migrate
from tests.conftest import gunicorn_server
from tests.e2e_access.conftest import ADMIN, assert_openai_error, bearer
from tests.e2e_access.private_services import PrivatePostgres, private_postgres, server_env, wait_for

pytestmark = pytest.mark.fault

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TIMEOUT_S = 2  # DB_CONNECT_TIMEOUT_S and DB_STATEMENT_TIMEOUT_S of the server under test
#: What one request may take at most while the database is away: the deadline plus a generous margin for
#: an overloaded machine. Without the deadline a hung database holds a request for as long as it hangs.
BOUND_S = TIMEOUT_S + 6


def timed(c: httpx.Client, method: str, path: str, **kw: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = c.request(method, path, **kw)
    return r, time.monotonic() - started


def database_lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "database" in line.lower()]


def assert_503(r: httpx.Response) -> None:
    assert_openai_error(r, 503, code="database_unavailable")
    assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1


def exercise_outage(c: httpx.Client, known: str, unknown: str, seconds: float) -> dict[str, int]:
    """Requests for `seconds` (past the key cache's 5 s freshness, so the database is asked again)."""
    counts = {"known": 0, "unknown": 0, "conversations": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, took = timed(c, "POST", CHAT, json=BODY, headers=bearer(known))
        assert r.status_code == 200, r.text  # a key seen before the outage keeps working from the cache
        assert took < BOUND_S, took
        counts["known"] += 1
        r, took = timed(c, "POST", CHAT, json=BODY, headers=bearer(unknown))
        assert_503(r)  # not 401: the key may be valid, the database cannot say
        assert took < BOUND_S, took
        counts["unknown"] += 1
        # a route that needs the database itself (the key is fine, the conversations are not reachable)
        r, took = timed(c, "GET", "/api/conversations", headers=bearer(known))
        assert_503(r)
        assert took < BOUND_S, took
        counts["conversations"] += 1
    return counts


def test_postgres_outage_and_hang_with_keys_on(tmp_path: Path) -> None:
    with private_postgres() as pg:
        migrate.upgrade(pg.url)
        env = server_env(
            tmp_path,
            pg.url,
            DB_CONNECT_TIMEOUT_S=str(TIMEOUT_S),
            DB_STATEMENT_TIMEOUT_S=str(TIMEOUT_S),
            DB_POOL_TIMEOUT_S=str(TIMEOUT_S),
            KEY_CACHE_STALE_S="300",
        )
        log = tmp_path / "gunicorn.log"
        with (
            gunicorn_server(env, log, ready_path="/healthz") as (_, url),
            httpx.Client(base_url=url, timeout=60) as c,
        ):
            created = [
                c.post("/admin/keys", json={"name": n}, headers=ADMIN) for n in ("used", "fresh", "late")
            ]
            assert all(r.status_code == 201 for r in created), [r.text for r in created]
            used, fresh, late = (r.json()["key"] for r in created)
            assert c.post(CHAT, json=BODY, headers=bearer(used)).status_code == 200  # now in the cache
            assert c.get("/api/conversations", headers=bearer(used)).status_code == 200
            before = len(database_lines(log))

            # -- outage: the server is gone, connections are refused
            pg.stop()
            counts = exercise_outage(c, used, fresh, seconds=8)
            garbage = c.post(CHAT, json=BODY, headers=bearer("not-a-key"))
            assert_openai_error(garbage, 401, code="invalid_api_key")  # no database needed to refuse this
            r = c.post("/admin/keys", json={"name": "x"}, headers=ADMIN)
            assert_503(r)
            assert "Traceback" not in log.read_text(errors="replace")
            lines = database_lines(log)[before:]
            requests = sum(counts.values())
            assert requests >= 9
            # one line per kind of failure and minute, not one per request
            assert 1 <= len(lines) <= 6, lines

            # -- back: the key the database never confirmed works as soon as it answers
            pg.start()
            wait_for(
                lambda: c.post(CHAT, json=BODY, headers=bearer(fresh)).status_code == 200,
                timeout=30,
                interval=0.5,
                what="the database to be back",
            )
            assert c.get("/api/conversations", headers=bearer(used)).status_code == 200

            # -- hang: every PostgreSQL process stopped; connections are accepted and never answered
            before = len(database_lines(log))
            pg.pause()
            try:
                counts = exercise_outage(c, used, late, seconds=8)
                assert counts["known"] >= 2
            finally:
                pg.resume()
            assert "Traceback" not in log.read_text(errors="replace")
            # the same failures within the minute: suppressed and counted, not one line per request
            lines = database_lines(log)[before:]
            assert len(lines) <= 8, lines
            assert sum(counts.values()) >= 6
            wait_for(
                lambda: c.post(CHAT, json=BODY, headers=bearer(late)).status_code == 200,
                timeout=30,
                interval=0.5,
                what="the database to answer again",
            )


def test_disabled_key_stops_at_once_even_if_the_database_then_goes_away(tmp_path: Path) -> None:
    with private_postgres() as pg:
        migrate.upgrade(pg.url)
        env = server_env(tmp_path, pg.url, DB_CONNECT_TIMEOUT_S="2", DB_STATEMENT_TIMEOUT_S="2")
        with (
            gunicorn_server(env, tmp_path / "g.log", ready_path="/healthz") as (_, url),
            httpx.Client(base_url=url, timeout=60) as c,
        ):
            info = c.post("/admin/keys", json={"name": "soon-off"}, headers=ADMIN).json()
            assert c.post(CHAT, json=BODY, headers=bearer(info["key"])).status_code == 200
            assert c.post(f"/admin/keys/{info['id']}/disable", headers=ADMIN).status_code == 200
            _stop(pg)
            r = c.post(CHAT, json=BODY, headers=bearer(info["key"]))
            assert_openai_error(r, 401, code="invalid_api_key")
            assert "disabled" in r.json()["error"]["message"]


def _stop(pg: PrivatePostgres) -> None:
    pg.stop()
