"""A team budget shared by three keys, served the production way: gunicorn with two workers sharing Redis
(and one worker with the in-process limiter), 200 concurrent requests; the team never spends more than
its budget, and its counter holds exactly what the request log says it used."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from llm_backend.limits import estimate_tokens
from tests.conftest import gunicorn_server
from tests.e2e_access.conftest import (
    REDIS_PREFIX,
    assert_openai_error,
    bearer,
    chat,
    redis_or_skip,
    remember_key,
    table_rows,
)
from tests.e2e_access.test_processes import base_env
from tests.org.test_admin import cli_json, run_cli

BUDGET = 3000
BODY = chat(max_tokens=100)  # more than the mock ever answers: no request uses more than it reserved


def team_with_three_keys(database_url: str) -> tuple[str, list[str]]:
    team = cli_json(
        database_url, "teams", "create", "--name", "shared", "--daily-tokens", str(BUDGET), "--json"
    )
    remember_key(f"team:{team['id']}")
    keys = []
    for i in range(3):
        proc = run_cli(database_url, "keys", "create", "--name", f"k{i}", "--team", "shared", "--json")
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        remember_key(info["id"])
        keys.append(info["secret"])
    return team["id"], keys


async def two_hundred(url: str, keys: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        return list(
            await asyncio.gather(
                *(c.post("/v1/chat/completions", json=BODY, headers=bearer(keys[i % 3])) for i in range(200))
            )
        )


def check(answers: list[httpx.Response], database_url: str, team_id: str) -> int:
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    for r in refused:
        err = assert_openai_error(r, 429, code="team_budget_exceeded", type_="insufficient_quota")
        assert err["param"] == "team"
    rows = [r for r in table_rows(database_url, "request_log") if r["team_id"] == team_id]
    assert sum(r["status_code"] == 200 for r in rows) == len(ok)
    spent = sum(r["total_tokens"] for r in rows)
    assert spent <= BUDGET, (spent, BUDGET)
    # a refusal needs a full budget (in flight or spent): at least as many got in as reservations fit
    assert len(ok) >= BUDGET // estimate_tokens(BODY, 1024)
    assert refused  # and the budget did stop the burst
    return spent


@pytest.mark.redis
async def test_two_workers_sharing_redis_never_overshoot_a_team_budget(tmp_path: Path, db_url: str) -> None:
    redis_url = redis_or_skip()
    team_id, keys = team_with_three_keys(db_url)
    env = {
        **base_env(tmp_path, db_url),
        "REDIS_URL": redis_url,
        "REDIS_TIMEOUT_S": "30",  # a loaded machine must not make the limiter fail open
        "WEB_CONCURRENCY": "2",
        "LLM_BACKEND_RECORDING": "true",
    }
    with gunicorn_server(env, tmp_path / "g.log", ready_path="/healthz") as (_, url):
        answers = await two_hundred(url, keys)
    spent = check(answers, db_url, team_id)  # gunicorn stopped: its recorders have drained

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        counter = client.hget(f"{REDIS_PREFIX}{{team:{team_id}}}:s", "du")
    finally:
        client.close()
    assert counter is not None and int(float(counter)) == spent  # settled to the exact usage


async def test_one_worker_in_memory_never_overshoots_a_team_budget(tmp_path: Path, sqlite_url: str) -> None:
    team_id, keys = team_with_three_keys(sqlite_url)
    env = {**base_env(tmp_path, sqlite_url), "WEB_CONCURRENCY": "1", "LLM_BACKEND_RECORDING": "true"}
    with gunicorn_server(env, tmp_path / "g.log", ready_path="/healthz") as (_, url):
        answers = await two_hundred(url, keys)
    check(answers, sqlite_url, team_id)
