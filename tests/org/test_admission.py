"""Requests on every level they belong to: a team's budget shared by its keys, a user's own limits, money
budgets at the model's prices, 429s that name the level, trusted front-ends naming their users, and who
sees which conversations."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from llm_backend.config import BackendConfig, ModelConfig, Prices
from llm_backend.limits import estimate_tokens
from tests.e2e_access.conftest import (
    ADMIN,
    assert_openai_error,
    bearer,
    chat,
    create_key,
    remember_key,
    retry_after,
    table_rows,
)

CHAT = "/v1/chat/completions"
OPEN_WEBUI = (
    "X-OpenWebUI-User-Id",
    "X-OpenWebUI-User-Email",
    "X-OpenWebUI-User-Name",
    "X-OpenWebUI-User-Role",
)


def team(c: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    r = c.post("/admin/teams", json={"name": name, **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    remember_key(f"team:{r.json()['id']}")  # its limiter state in Redis is deleted after the test
    return r.json()


def as_user(key: str, uid: str, email: str | None = None, role: str = "user") -> dict[str, str]:
    values = (uid, email or f"{uid}@example.com", uid.title(), role)
    return {**bearer(key), **dict(zip(OPEN_WEBUI, values, strict=True))}


def test_a_team_budget_is_shared_by_its_keys_and_its_429_names_the_team(
    serve, http, limiter_redis_url, sqlite_url
) -> None:
    url = serve(redis_url=limiter_redis_url, recording=True)
    c = http(url)
    t = team(c, "research", daily_tokens=400)
    keys = [create_key(c, f"k{i}", team="research")["key"] for i in range(2)]
    body = chat(max_tokens=100)  # reserves about 110 tokens; the mock answers with far fewer
    answers = [c.post(CHAT, json=body, headers=bearer(keys[i % 2])) for i in range(12)]
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert ok and refused
    err = assert_openai_error(refused[0], 429, code="team_budget_exceeded", type_="insufficient_quota")
    assert err["param"] == "team" and "team 'research'" in err["message"]
    assert refused[0].headers["x-ratelimit-level"] == "team"
    assert retry_after(refused[0]) >= 1
    # a key of no team is not bound by it
    lone = create_key(c, "lone")["key"]
    assert c.post(CHAT, json=body, headers=bearer(lone)).status_code == 200
    serve.stop(url)
    rows = [r for r in table_rows(sqlite_url, "request_log") if r["team_id"] == t["id"]]
    assert sum(r["status_code"] == 200 for r in rows) == len(ok)
    assert sum(r["total_tokens"] for r in rows) <= 400


def test_team_rate_limit_and_allowed_models(serve, http, limiter_redis_url) -> None:
    c = http(serve(redis_url=limiter_redis_url))
    team(c, "small", rpm=2, models=["m"])
    key = create_key(c, "k", team="small")["key"]
    assert_openai_error(c.post(CHAT, json=chat("other"), headers=bearer(key)), 404, code="model_not_found")
    assert [m["id"] for m in c.get("/v1/models", headers=bearer(key)).json()["data"]] == ["m"]
    assert c.post(CHAT, json=chat(), headers=bearer(key)).status_code == 200
    r = c.post(CHAT, json=chat(), headers=bearer(key))
    assert r.status_code == 200
    # the tightest level's headers: the team allows 2 a minute, the key is unlimited
    assert r.headers["x-ratelimit-limit-requests"] == "2"
    err = assert_openai_error(c.post(CHAT, json=chat(), headers=bearer(key)), 429, code="rate_limit_exceeded")
    assert err["param"] == "team"


def test_trusted_front_end_names_its_users_and_others_cannot(serve, http, sqlite_url, caplog) -> None:
    url = serve(recording=True)
    c = http(url)
    ui = create_key(c, "open-webui", trusted_ui=True)
    other = create_key(c, "script")
    with caplog.at_level(logging.INFO, logger="llm_backend.access"):
        assert c.post(CHAT, json=chat(), headers=as_user(ui["key"], "alice", role="admin")).status_code == 200
        assert c.post(CHAT, json=chat(), headers=as_user(other["key"], "alice")).status_code == 200
    ignored = [r for r in caplog.records if getattr(r, "user_headers_ignored", False)]
    assert len(ignored) == 1 and ignored[0].key_id == other["id"]
    trusted = [r for r in caplog.records if getattr(r, "trusted_user", None) == "alice"]
    assert len(trusted) == 1 and trusted[0].trusted_user_role == "admin"

    users = c.get("/admin/users", headers=ADMIN).json()["data"]
    assert [(u["subject"], u["email"]) for u in users] == [("alice", "alice@example.com")]
    alice = users[0]
    assert alice["issuer"] == f"urn:llm-backend:trusted-ui:{ui['id']}"
    # the user's own limit applies to every request that front-end makes for them, and only for them
    c.patch(f"/admin/users/{alice['id']}", json={"rpm": 1}, headers=ADMIN)
    assert c.post(CHAT, json=chat(), headers=as_user(ui["key"], "alice")).status_code == 200
    err = assert_openai_error(c.post(CHAT, json=chat(), headers=as_user(ui["key"], "alice")), 429)
    assert (err["param"], err["code"]) == ("user", "rate_limit_exceeded")
    assert c.post(CHAT, json=chat(), headers=as_user(ui["key"], "bob")).status_code == 200
    serve.stop(url)
    rows = table_rows(sqlite_url, "request_log")
    by_key = {(r["key_id"], r["user_id"]) for r in rows if r["status_code"] == 200}
    assert (ui["id"], alice["id"]) in by_key
    assert (other["id"], None) in by_key  # the untrusted key's headers named nobody


def test_a_front_end_cannot_speak_for_another_front_ends_users(serve, http) -> None:
    c = http(serve())
    a = create_key(c, "ui-a", trusted_ui=True)["key"]
    b = create_key(c, "ui-b", trusted_ui=True)["key"]
    c.post(CHAT, json=chat(), headers=as_user(a, "carol"))
    c.post(CHAT, json=chat(), headers=as_user(b, "carol"))
    users = c.get("/admin/users", headers=ADMIN).json()["data"]
    assert len(users) == 2 and len({u["issuer"] for u in users}) == 2


def test_money_budget_at_the_models_prices(serve, http, limiter_redis_url, sqlite_url) -> None:
    prices = Prices(input=2000.0, cached_input=1000.0, output=8000.0)  # per million tokens
    model = ModelConfig(name="m", backends=(BackendConfig(provider="mock", name="m-mock"),), prices=prices)
    url = serve(models=(model,), redis_url=limiter_redis_url, recording=True)
    c = http(url)
    budget = 2.0
    t = team(c, "paying", daily_spend=budget)
    key = create_key(c, "k", team="paying")["key"]
    body = chat(max_tokens=100)  # more than the mock answers: no request costs more than it reserved
    # the gate reserves the estimate at the dearer price: about 110 tokens x 8000 / 1e6 = 0.88 a request
    answers = [c.post(CHAT, json=body, headers=bearer(key)) for _ in range(40)]
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert ok and refused, [r.status_code for r in answers]
    err = assert_openai_error(refused[-1], 429, code="team_budget_exceeded", type_="insufficient_quota")
    assert err["param"] == "team" and "daily spend budget" in err["message"]
    serve.stop(url)
    rows = [
        r
        for r in table_rows(sqlite_url, "request_log")
        if r["team_id"] == t["id"] and r["status_code"] == 200
    ]
    spent = sum(
        (r["prompt_tokens"] * prices.input + r["completion_tokens"] * prices.output) / 1e6 for r in rows
    )
    assert len(rows) == len(ok)
    assert 0 < spent <= budget
    # the real cost was settled, not the reservation: the budget was spent up to less than one reservation
    reserved_each = estimate_tokens(body, 1024) * prices.output / 1e6
    assert spent > budget - reserved_each, (spent, reserved_each)
    assert len(ok) > budget // reserved_each  # more got in than reservations alone would have let in


def conversations(c: httpx.Client, headers: dict[str, str]) -> set[str]:
    r = c.get("/api/conversations?limit=100", headers=headers)
    assert r.status_code == 200, r.text
    return {conv["title"] for conv in r.json()["data"]}


def wait_for(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_users_see_their_own_conversations_and_team_admins_their_teams(serve, http) -> None:
    c = http(serve(recording=True))
    team(c, "lab")
    ui = create_key(c, "ui", team="lab", trusted_ui=True)["key"]
    for uid in ("dora", "eve"):
        body = {"model": "m", "messages": [{"role": "user", "content": f"Notes of {uid} about the moon"}]}
        assert c.post(CHAT, json=body, headers=as_user(ui, uid)).status_code == 200
    assert wait_for(lambda: len(conversations(c, ADMIN)) >= 2)
    dora = conversations(c, as_user(ui, "dora"))
    eve = conversations(c, as_user(ui, "eve"))
    assert len(dora) == 1 and len(eve) == 1 and dora != eve
    # the front-end's key alone (no user named) owns none of them
    assert conversations(c, bearer(ui)) == set()
    # a team admin sees the team's conversations; the admin key sees everything
    boss = {"X-OpenWebUI-User-Id": "frank"}
    conversations(c, {**bearer(ui), **boss})  # frank signs in once
    frank = next(u for u in c.get("/admin/users", headers=ADMIN).json()["data"] if u["subject"] == "frank")
    c.patch(f"/admin/users/{frank['id']}", json={"admin_of": ["lab"]}, headers=ADMIN)
    assert conversations(c, {**bearer(ui), **boss}) == dora | eve
    assert conversations(c, ADMIN) >= dora | eve
    # eve cannot read dora's conversation by its id
    listed = c.get("/api/conversations", headers=as_user(ui, "dora")).json()["data"]
    r = c.get(f"/api/conversations/{listed[0]['id']}", headers=as_user(ui, "eve"))
    assert_openai_error(r, 404)


def test_usage_by_user_and_team(serve, http, sqlite_url) -> None:
    url = serve(recording=True)
    c = http(url)
    t = team(c, "lab")
    ui = create_key(c, "ui", team="lab", trusted_ui=True)["key"]
    for uid in ("gus", "gus", "hal"):
        c.post(CHAT, json=chat(), headers=as_user(ui, uid))

    def rows() -> list[dict[str, Any]]:
        r = c.get("/admin/usage?group_by=team,user_id", headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    assert wait_for(lambda: sum(r["requests"] for r in rows()) >= 3)
    by_user = {r["user_email"]: r for r in rows()}
    assert by_user["gus@example.com"]["requests"] == 2 and by_user["hal@example.com"]["requests"] == 1
    assert {r["team_name"] for r in rows()} == {"lab"} and {r["team_id"] for r in rows()} == {t["id"]}
    only = c.get(f"/admin/usage?group_by=model&team_id={t['id']}", headers=ADMIN).json()["data"]
    assert only[0]["requests"] == 3
    assert_openai_error(c.get("/admin/usage?group_by=colour", headers=ADMIN), 400)


def test_user_headers_are_cleaned(serve, http) -> None:
    c = http(serve())
    ui = create_key(c, "ui", trusted_ui=True)["key"]
    headers = {
        **bearer(ui),
        "X-OpenWebUI-User-Id": "u" * 5000,
        "X-OpenWebUI-User-Name": "José Núñez".encode(),
        "X-OpenWebUI-User-Email": b"\x85",  # a C1 control character: nothing left
    }
    r = c.post(CHAT, json=chat(), headers=headers)
    assert r.status_code == 200, r.text
    (user,) = c.get("/admin/users", headers=ADMIN).json()["data"]
    assert user["subject"] == "u" * 255 and user["name"] == "José Núñez" and user["email"] is None
    # a header without the user's id names nobody
    assert (
        c.post(CHAT, json=chat(), headers={**bearer(ui), "X-OpenWebUI-User-Email": "x@y"}).status_code == 200
    )
    assert len(c.get("/admin/users", headers=ADMIN).json()["data"]) == 1


def test_team_counters_lost_in_redis_are_seeded_from_the_request_log(serve, http) -> None:
    import redis

    from tests.e2e_access.conftest import REDIS_PREFIX, redis_or_skip

    redis_url = redis_or_skip()
    c = http(serve(redis_url=redis_url, recording=True))
    t = team(c, "seeded", daily_tokens=100_000, daily_spend=None)
    key = create_key(c, "k", team="seeded")["key"]
    for _ in range(3):
        assert c.post(CHAT, json=chat(max_tokens=100), headers=bearer(key)).status_code == 200

    def logged() -> int:
        rows = c.get(f"/admin/usage?group_by=team&team_id={t['id']}", headers=ADMIN).json()["data"]
        return rows[0]["total_tokens"] if rows and rows[0]["requests"] == 3 else 0

    before = wait_for(logged)
    assert before > 0
    client = redis.Redis.from_url(redis_url)
    name = f"{REDIS_PREFIX}{{team:{t['id']}}}:s"
    try:
        assert int(float(client.hget(name, "du") or 0)) == before
        client.delete(name)  # Redis lost the team's counters (a restart without persistence)
        r = c.post(CHAT, json=chat(max_tokens=100), headers=bearer(key))
        assert r.status_code == 200
        # the day's usage came back from the request log, then this request's was added
        assert int(float(client.hget(name, "du") or 0)) == before + r.json()["usage"]["total_tokens"]
    finally:
        client.close()
