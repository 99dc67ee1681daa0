"""`llm-backend migrate|usage|prune` as subprocesses, and /readyz against an unmigrated database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from llm_backend.db import migrate
from llm_backend.db.repositories import RequestLogRepository
from llm_backend.db.session import make_engine, session_scope
from tests.e2e_recording.conftest import mock_model, request_rows

CLI = Path(sys.executable).with_name("llm-backend")


def cli(*args: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [str(CLI), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _old_row(request_id: str, when: datetime) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "created_at": when,
        "route": "/v1/chat/completions",
        "operation": "chat",
        "status_code": 200,
        "outcome": "ok",
        "stream": False,
        "model_requested": "mock",
        "model": "mock",
        "attempts": 1,
        "prompt_tokens": 1000,
        "completion_tokens": 1000,
        "total_tokens": 2000,
        "tokens_estimated": False,
        "latency_ms": 1.0,
    }


def test_cli_migrate_usage_and_prune(empty_db_url: str, app_for: Callable[..., Any], tmp_path: Path) -> None:
    url = empty_db_url
    done = cli("migrate", url=url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"is at revision {migrate.head_revision()}" in done.stdout

    app = app_for(url, [mock_model()])
    with app.test_client() as c:
        for i in range(3):
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": "mock",
                    "messages": [{"role": "user", "content": f"question {i}"}],
                    "user": "u1",
                },
            )
            assert r.status_code == 200
        assert c.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code in (
            400,
            404,
        )
    rows = request_rows(url)
    assert len(rows) == 4
    ok_rows = [r for r in rows if r["outcome"] == "ok"]

    usage = cli("usage", "--since", "1d", "--json", url=url, cwd=tmp_path)
    assert usage.returncode == 0, usage.stderr
    totals = json.loads(usage.stdout)
    by_model = {t["model"]: t for t in totals}
    assert by_model["mock"]["requests"] == 3
    assert by_model["mock"]["errors"] == 0
    assert by_model["mock"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in ok_rows)
    assert by_model["mock"]["completion_tokens"] == sum(r["completion_tokens"] for r in ok_rows)
    assert by_model["mock"]["total_tokens"] == sum(r["total_tokens"] for r in ok_rows) > 0
    assert sum(t["requests"] for t in totals) == 4
    assert sum(t["errors"] for t in totals) == 1

    table = cli("usage", "--since", "1d", "--group-by", "model", url=url, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["model", "requests", "errors"]
    mock_line = next(line for line in lines if line.split()[0] == "mock").split()
    assert mock_line[1] == "3" and str(by_model["mock"]["total_tokens"]) in mock_line

    # rows older than the cutoff, inserted through the repository
    engine = make_engine(url)
    try:
        now = datetime.now(UTC)
        with session_scope(engine) as session:
            RequestLogRepository(session).insert_ignore(
                [_old_row("old-1", now - timedelta(days=3)), _old_row("old-2", now - timedelta(days=40))]
            )
    finally:
        engine.dispose()
    week = json.loads(cli("usage", "--since", "7d", "--json", url=url, cwd=tmp_path).stdout)
    assert sum(t["requests"] for t in week) == 5  # old-1 is within a week, old-2 is not

    pruned = cli("prune", "--older-than", "1d", url=url, cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 2 rows" in pruned.stdout
    left = request_rows(url)
    assert sorted(r["request_id"] for r in left) == sorted(r["request_id"] for r in rows)
    again = cli("prune", "--older-than", "1d", url=url, cwd=tmp_path)
    assert "deleted 0 rows" in again.stdout

    bad = cli("prune", "--older-than", "soon", url=url, cwd=tmp_path)
    assert bad.returncode == 2 and "duration" in bad.stderr


def test_readyz_names_the_migrate_command_until_migrated(
    empty_db_url: str, app_for: Callable[..., Any]
) -> None:
    app = app_for(empty_db_url, [mock_model()])
    with app.test_client() as c:
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "not ready"
        message = body["checks"]["database"]["message"]
        assert "make migrate" in message and "llm-backend migrate" in message
        assert body["checks"]["database"]["ok"] is False
        assert c.get("/healthz").status_code == 200  # alive, just not ready

        migrate.upgrade(empty_db_url)
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ready"
        assert r.json()["checks"]["database"]["ok"] is True

        # requests recorded while the schema was missing are not lost either (spilled, then replayed)
        chat = c.post(
            "/v1/chat/completions", json={"model": "mock", "messages": [{"role": "user", "content": "x"}]}
        )
        assert chat.status_code == 200
    assert len(request_rows(empty_db_url)) == 1


def test_readyz_reports_a_schema_behind_head(empty_db_url: str, app_for: Callable[..., Any]) -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config())
    revisions = list(script.walk_revisions())
    if len(revisions) < 2:
        migrate.upgrade(empty_db_url)
        migrate.downgrade(empty_db_url, "base")
    else:
        migrate.upgrade(empty_db_url, revisions[-1].revision)  # the first migration only
    app = app_for(empty_db_url, [mock_model()])
    with app.test_client() as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "llm-backend migrate" in r.json()["checks"]["database"]["message"]
