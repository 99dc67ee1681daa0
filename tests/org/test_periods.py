"""Budgets for a fixed period through the admin API, the CLI and the serving path: round trips, hostile
input, refusals before and after the period, re-seeding from the request log, and a team's period spend
shared by two keys of a two-worker gunicorn on Redis that never overshoots."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from pytest_httpserver import HTTPServer

from llm_backend.config import Prices
from llm_backend.db.session import make_engine
from llm_backend.limits import estimate_tokens
from tests.conftest import gunicorn_server
from tests.e2e_access.conftest import (
    ADMIN,
    REDIS_PREFIX,
    assert_openai_error,
    bearer,
    chat,
    create_key,
    redis_or_skip,
    remember_key,
    table_rows,
)
from tests.e2e_access.test_processes import base_env
from tests.org.test_admin import cli_json, run_cli
from tests.org.test_admission import team

CHAT = "/v1/chat/completions"


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def now() -> datetime:
    return datetime.now(UTC)


BAD_PERIODS: list[tuple[dict[str, Any], str]] = [
    ({"period_tokens": 10}, "period_end"),  # a period budget needs an end
    ({"period_tokens": 10, "period_start": "2027-02-01", "period_end": "2027-01-01"}, "period_end"),
    ({"period_tokens": 10, "period_start": "2027-01-01", "period_end": "2027-01-01"}, "period_end"),
    ({"period_tokens": 10, "period_end": "2020-01-01"}, "period_end"),  # ends before now (its default start)
    ({"period_tokens": 10, "period_end": "next tuesday"}, "period_end"),
    ({"period_tokens": 10, "period_end": "2027-13-01"}, "period_end"),
    ({"period_tokens": 10, "period_end": "10000-01-01"}, "period_end"),
    ({"period_tokens": 10, "period_end": "99999-01-01T00:00:00Z"}, "period_end"),
    ({"period_tokens": 10, "period_start": "yesterday", "period_end": "2027-01-01"}, "period_start"),
    ({"period_tokens": 10, "period_end": ""}, "period_end"),
    ({"period_tokens": -1, "period_end": "2099-01-01"}, "period_tokens"),
    ({"period_tokens": 2**60, "period_end": "2099-01-01"}, "period_tokens"),
    ({"period_spend": -0.01, "period_end": "2099-01-01"}, "period_spend"),
    ({"period_spend": 1e300, "period_end": "2099-01-01"}, "period_spend"),
    ({"period_tokens": True, "period_end": "2099-01-01"}, "period_tokens"),
    ({"period_tokens": 10, "period_end": 20270101}, "period_end"),
]


def test_period_fields_over_http(serve, http, sqlite_url) -> None:
    c = http(serve())
    end = now().replace(microsecond=0) + timedelta(days=30)
    t = team(c, "research", period_spend=25.5, period_end=iso(end))
    assert (t["period_spend"], t["period_tokens"]) == (25.5, None)
    start = datetime.fromisoformat(t["period_start"])
    assert abs((start - now()).total_seconds()) < 600  # defaults to when it was set
    assert datetime.fromisoformat(t["period_end"]) == end
    assert c.get("/admin/teams/research", headers=ADMIN).json()["period_end"] == t["period_end"]
    listed = c.get("/admin/teams", headers=ADMIN).json()["data"]
    assert listed[0]["period_spend"] == 25.5

    # a date is 00:00 UTC; a time without a zone is UTC; other zones are converted
    r = c.patch(
        "/admin/teams/research",
        json={"period_start": "2026-01-01", "period_end": "2099-06-30T12:00:00+02:00", "period_tokens": 900},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["period_start"], r.json()["period_end"], r.json()["period_tokens"]) == (
        "2026-01-01T00:00:00+00:00",
        "2099-06-30T10:00:00+00:00",
        900,
    )
    # end before the stored start (an update is checked against what is stored)
    err = assert_openai_error(
        c.patch("/admin/teams/research", json={"period_end": "2025-12-31"}, headers=ADMIN), 400
    )
    assert err["param"] == "period_end"
    # clearing the budgets and the end clears the period
    r = c.patch(
        "/admin/teams/research",
        json={"period_tokens": None, "period_spend": None, "period_end": None},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert [r.json()[f] for f in ("period_tokens", "period_spend", "period_start", "period_end")] == [
        None
    ] * 4

    for bad, param in BAD_PERIODS:
        for path in ("/admin/teams", "/admin/keys"):
            err = assert_openai_error(c.post(path, json={"name": "x", **bad}, headers=ADMIN), 400)
            assert err["param"] == param, (path, bad, err)
        err = assert_openai_error(c.patch("/admin/teams/research", json=bad, headers=ADMIN), 400)
        assert err["param"] == param, (bad, err)

    key = create_key(c, "k", period_tokens=5000, period_start="2026-01-01T08:00:00Z", period_end="2099-01-01")
    assert (key["period_tokens"], key["period_start"], key["period_end"]) == (
        5000,
        "2026-01-01T08:00:00+00:00",
        "2099-01-01T00:00:00+00:00",
    )
    shown = c.get(f"/admin/keys/{key['id']}", headers=ADMIN).json()
    assert shown["period_tokens"] == 5000 and "key_hash" not in shown
    r = c.patch(f"/admin/keys/{key['id']}", json={"period_spend": 3, "period_tokens": None}, headers=ADMIN)
    assert (r.json()["period_spend"], r.json()["period_tokens"]) == (3.0, None)
    assert r.json()["period_start"] == "2026-01-01T08:00:00+00:00"  # unchanged: the same counter

    from llm_backend.services.org import OrgStore

    engine = make_engine(sqlite_url)
    try:
        OrgStore(engine).resolve_user(
            subject="oid-9", issuer="https://login.example/t", email="cy@example.com"
        )
    finally:
        engine.dispose()
    for bad, param in BAD_PERIODS:  # a user without a period yet
        err = assert_openai_error(c.patch("/admin/users/cy@example.com", json=bad, headers=ADMIN), 400)
        assert err["param"] == param, (bad, err)
    r = c.patch(
        "/admin/users/cy@example.com", json={"period_tokens": 100, "period_end": "2099-01-01"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["period_tokens"] == 100, r.text
    assert (
        c.get("/admin/users/cy@example.com", headers=ADMIN).json()["period_end"]
        == "2099-01-01T00:00:00+00:00"
    )


def test_period_flags_from_the_cli(db_url) -> None:
    team_info = cli_json(
        db_url,
        "teams",
        "create",
        "--name",
        "research",
        "--period-spend",
        "12.5",
        "--period-start",
        "2026-01-01",
        "--period-end",
        "2099-01-01T00:00:00Z",
        "--json",
    )
    assert (team_info["period_spend"], team_info["period_start"], team_info["period_end"]) == (
        12.5,
        "2026-01-01T00:00:00+00:00",
        "2099-01-01T00:00:00+00:00",
    )
    listed = run_cli(db_url, "teams", "list")
    assert (
        listed.returncode == 0 and "period_end" in listed.stdout and "2099-01-01T00:00:00Z" in listed.stdout
    )
    updated = cli_json(db_url, "teams", "update", "research", "--period-tokens", "5000", "--json")
    assert (updated["period_tokens"], updated["period_spend"]) == (5000, 12.5)
    cleared = cli_json(
        db_url,
        "teams",
        "update",
        "research",
        "--period-tokens",
        "none",
        "--period-spend",
        "none",
        "--period-end",
        "none",
        "--json",
    )
    assert (cleared["period_tokens"], cleared["period_spend"], cleared["period_end"]) == (None, None, None)

    proc = run_cli(
        db_url,
        "keys",
        "create",
        "--name",
        "k",
        "--period-tokens",
        "1000",
        "--period-end",
        "2099-01-01",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    key = json.loads(proc.stdout)
    assert key["period_tokens"] == 1000 and key["period_start"] is not None
    moved = cli_json(db_url, "keys", "update", key["id"], "--period-start", "2026-06-01", "--json")
    assert moved["period_start"] == "2026-06-01T00:00:00+00:00"
    shown = run_cli(db_url, "keys", "list")
    assert shown.returncode == 0 and "period_tokens" in shown.stdout

    for args, word in [
        (
            ["--period-tokens", "10", "--period-start", "2027-02-01", "--period-end", "2027-01-01"],
            "period_end",
        ),
        (["--period-tokens", "10", "--period-end", "soon"], "period_end"),
        (["--period-tokens", "10", "--period-end", "10000-01-01"], "period_end"),
        (["--period-spend", "-3", "--period-end", "2099-01-01"], "period_spend"),
        (["--period-spend", "lots", "--period-end", "2099-01-01"], "period_spend"),
        (["--period-tokens", "10"], "period_end"),
    ]:
        for cmd in (["teams", "create", "--name", "bad"], ["keys", "create", "--name", "bad"]):
            bad = run_cli(db_url, *cmd, *args)
            assert bad.returncode != 0 and word in bad.stderr and "Traceback" not in bad.stderr, (
                cmd,
                args,
                bad,
            )
    bad = run_cli(db_url, "keys", "update", key["id"], "--period-end", "2020-01-01")
    assert bad.returncode != 0 and "period_end" in bad.stderr

    from llm_backend.services.org import OrgStore

    engine = make_engine(db_url)
    try:
        OrgStore(engine).resolve_user(
            subject="oid-2", issuer="https://login.example/t", email="di@example.com"
        )
    finally:
        engine.dispose()
    user = cli_json(
        db_url,
        "users",
        "update",
        "di@example.com",
        "--period-tokens",
        "700",
        "--period-end",
        "2099-01-01",
        "--json",
    )
    assert user["period_tokens"] == 700 and user["period_start"] is not None
    assert cli_json(db_url, "users", "show", "di@example.com")["period_end"] == "2099-01-01T00:00:00+00:00"
    bad = run_cli(db_url, "users", "update", "di@example.com", "--period-start", "2100-01-01")
    assert bad.returncode != 0 and "period_end" in bad.stderr  # the stored end is before the new start


def test_the_migration_keeps_existing_rows_working(tmp_path: Path, serve, http) -> None:
    import sqlalchemy as sa

    from llm_backend.db import migrate
    from llm_backend.db.repositories import hash_api_key

    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url, "0008")
    secret = "sk-llmb-" + "B" * 43
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, name, key_prefix, key_hash, daily_tokens, enabled, created_at, trusted_ui) "
                "VALUES ('key_old', 'old', 'sk-llmb-BBBB', :h, 100000, 1, '2026-01-01 00:00:00.000000', 0)"
            ),
            {"h": hash_api_key(secret)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO teams (id, name, daily_spend, created_at, updated_at) "
                "VALUES ('team_old', 'old', 5.0, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
    engine.dispose()
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        assert migrate.current_revision(engine) == "0009"
    finally:
        engine.dispose()
    c = http(serve(database_url=url))
    key = c.get("/admin/keys/key_old", headers=ADMIN).json()
    assert (key["daily_tokens"], key["period_tokens"], key["period_end"]) == (100000, None, None)
    old_team = c.get("/admin/teams/old", headers=ADMIN).json()
    assert (old_team["daily_spend"], old_team["period_spend"], old_team["period_start"]) == (5.0, None, None)
    assert c.post(CHAT, json=chat(), headers=bearer(secret)).status_code == 200


def test_outside_its_period_a_level_admits_nothing(serve, http, limiter_redis_url) -> None:
    c = http(serve(redis_url=limiter_redis_url))
    later = now() + timedelta(hours=3)
    team(
        c, "future", period_tokens=10_000, period_start=iso(later), period_end=iso(later + timedelta(days=1))
    )
    team(c, "past", period_tokens=10_000, period_start="2020-01-01", period_end="2020-02-01")
    waiting = create_key(c, "w", team="future")["key"]
    ended = create_key(c, "e", team="past")["key"]

    r = c.post(CHAT, json=chat(), headers=bearer(waiting))
    err = assert_openai_error(r, 429, code="team_budget_exceeded", type_="insufficient_quota")
    assert err["param"] == "team" and r.headers["x-ratelimit-level"] == "team"
    assert "The team's budget period starts at" in err["message"]
    assert 2 * 3600 < int(r.headers["Retry-After"]) <= 3 * 3600 + 60

    r = c.post(CHAT, json=chat(), headers=bearer(ended))
    err = assert_openai_error(r, 429, code="team_budget_exceeded")
    assert "The team's budget period ended at 2020-02-01T00:00:00Z" in err["message"]
    assert "Retry-After" not in r.headers  # waiting does not help

    # a key's own period: insufficient_quota, param "key"
    own = create_key(c, "own", period_tokens=10, period_start="2020-01-01", period_end="2020-01-02")["key"]
    r = c.post(CHAT, json=chat(), headers=bearer(own))
    err = assert_openai_error(r, 429, code="insufficient_quota")
    assert err["param"] == "key" and "API key's budget period ended" in err["message"]


def test_a_lost_period_counter_is_reseeded_from_the_request_log(
    serve, http, limiter_redis_url, sqlite_url
) -> None:
    body = chat(max_tokens=100)  # reserves about 110 tokens; the mock answers with fewer
    first = serve(redis_url=limiter_redis_url, recording=True)
    c = http(first)
    t = team(c, "seeded", period_tokens=100_000, period_start="2026-01-01", period_end="2099-01-01")
    key = create_key(c, "k", team="seeded")["key"]
    assert all(c.post(CHAT, json=body, headers=bearer(key)).status_code == 200 for _ in range(3))
    serve.stop(first)  # the recorder drains: the log has the three requests
    spent = sum(r["total_tokens"] for r in table_rows(sqlite_url, "request_log") if r["team_id"] == t["id"])
    assert spent > 0

    if limiter_redis_url:  # Redis lost the counter (a restart, a flush)
        import redis

        client = redis.Redis.from_url(limiter_redis_url)
        try:
            names = list(client.scan_iter(match=f"{REDIS_PREFIX}{{team:{t['id']}}}*"))
            assert any(b":b:" in n for n in names), names
            client.delete(*names)
        finally:
            client.close()
    second = serve(redis_url=limiter_redis_url, recording=True)  # in memory: a fresh worker
    c2 = http(second)
    # the same period (same start: the same counter), with only a few tokens left after what the log holds
    r = c2.patch("/admin/teams/seeded", json={"period_tokens": spent + 5}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["period_start"] == "2026-01-01T00:00:00+00:00", r.text
    refused = c2.post(CHAT, json=body, headers=bearer(key))
    err = assert_openai_error(refused, 429, code="team_budget_exceeded")
    assert "period token budget" in err["message"] and f"used {spent}," in err["message"], err
    assert "Retry-After" not in refused.headers
    # a new start is a new period: it counts afresh from the log (nothing since now)
    r = c2.patch("/admin/teams/seeded", json={"period_start": "now"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert c2.post(CHAT, json=body, headers=bearer(key)).status_code == 200


# -- served the production way --------------------------------------------------------------------------

PROMPT, COMPLETION = 12, 30
PRICES = Prices(input=1000.0, cached_input=500.0, output=4000.0)  # per million tokens
COST_EACH = (PROMPT * PRICES.input + COMPLETION * PRICES.output) / 1e6  # 0.132
BUDGET = 3.0

UPSTREAM_YAML = """\
models:
  - name: m
    retries: 0
    prices: {{input: 1000, cached_input: 500, output: 4000}}
    backends:
      - provider: openai
        name: fake
        base_url: {url}
        api_key: upstream-key
"""


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": PROMPT,
            "completion_tokens": COMPLETION,
            "total_tokens": PROMPT + COMPLETION,
        },
    }


@pytest.mark.redis
async def test_two_workers_never_overshoot_a_team_period_spend_shared_by_two_keys(
    tmp_path: Path, db_url: str
) -> None:
    redis_url = redis_or_skip()
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.expect_request("/v1/chat/completions", method="POST").respond_with_json(_completion())
    server.start()
    try:
        config = tmp_path / "upstream.yaml"
        config.write_text(UPSTREAM_YAML.format(url=server.url_for("/v1")), encoding="utf-8")
        start = iso((now() - timedelta(hours=1)).replace(microsecond=0))
        t = cli_json(
            db_url,
            "teams",
            "create",
            "--name",
            "shared",
            "--period-spend",
            str(BUDGET),
            "--period-start",
            start,
            "--period-end",
            iso(now() + timedelta(days=7)),
            "--json",
        )
        remember_key(f"team:{t['id']}")
        secrets = []
        for i in range(2):
            proc = run_cli(db_url, "keys", "create", "--name", f"k{i}", "--team", "shared", "--json")
            assert proc.returncode == 0, proc.stderr
            info = json.loads(proc.stdout)
            remember_key(info["id"])
            secrets.append(info["secret"])
        env = {
            **base_env(tmp_path, db_url),
            "LLM_BACKEND_CONFIG": str(config),
            "REDIS_URL": redis_url,
            "REDIS_TIMEOUT_S": "30",  # a loaded machine must not make the limiter fail open
            "WEB_CONCURRENCY": "2",
            "LLM_BACKEND_RECORDING": "true",
        }
        ok: list[Any] = []
        refused: list[openai.RateLimitError] = []
        with gunicorn_server(env, tmp_path / "g.log", ready_path="/healthz") as (_, url):
            clients = [
                openai.AsyncOpenAI(api_key=s, base_url=f"{url}/v1", max_retries=0, timeout=120)
                for s in secrets
            ]

            async def one(i: int) -> None:
                try:
                    ok.append(
                        await clients[i % 2].chat.completions.create(
                            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=COMPLETION
                        )
                    )
                except openai.RateLimitError as exc:
                    refused.append(exc)

            await asyncio.gather(*(one(i) for i in range(60)))
            for client in clients:
                await client.close()
        # gunicorn stopped: its recorders have drained
        assert ok and refused, (len(ok), len(refused))
        for exc in refused:
            assert exc.code == "team_budget_exceeded" and exc.type == "insufficient_quota", exc.body
            assert exc.param == "team" and exc.response.headers["x-ratelimit-level"] == "team"
            assert "period spend budget" in exc.message and "Retry-After" not in exc.response.headers
        rows = [
            r
            for r in table_rows(db_url, "request_log")
            if r["team_id"] == t["id"] and r["status_code"] == 200
        ]
        assert len(rows) == len(ok)
        spent = sum(float(r["cost"]) for r in rows)
        assert spent <= BUDGET + 1e-9, spent
        assert spent == pytest.approx(COST_EACH * len(ok))
        # a refusal needs the budget spent or reserved: at least as many got in as reservations fit
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": COMPLETION}
        assert len(ok) >= BUDGET // (estimate_tokens(body, 1024) * PRICES.output / 1e6)

        import redis

        client = redis.Redis.from_url(redis_url)
        try:
            names = list(client.scan_iter(match=f"{REDIS_PREFIX}{{team:{t['id']}}}:b:*"))
            assert len(names) == 1
            counted = int(float(client.hget(names[0], "pc") or 0))
        finally:
            client.close()
        assert counted == round(spent * 1_000_000)  # settled to the exact cost
    finally:
        server.clear()
        server.stop()
