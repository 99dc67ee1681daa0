"""Teams and users through the admin API and the CLI: CRUD, hostile input, keys given a team and a user,
and the migration of a database whose keys existed before teams."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from llm_backend.db import migrate
from llm_backend.db.session import make_engine
from tests.e2e_access.conftest import (
    ADMIN,
    CLI,
    REPO,
    assert_openai_error,
    bearer,
    chat,
    create_key,
)

CHAT = "/v1/chat/completions"


def test_team_crud_over_http(serve, http, db_url) -> None:
    c = http(serve(database_url=db_url))
    r = c.post(
        "/admin/teams",
        json={
            "name": "research",
            "models": ["m"],
            "rpm": 100,
            "daily_tokens": 5000,
            "daily_spend": 2.5,
            "monthly_spend": 40,
            "groups": ["grp-1", "grp-2"],
        },
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    team = r.json()
    assert team["object"] == "team" and team["id"].startswith("team_")
    assert (team["name"], team["models"], team["rpm"], team["daily_spend"], team["monthly_spend"]) == (
        "research",
        ["m"],
        100,
        2.5,
        40.0,
    )
    assert team["groups"] == ["grp-1", "grp-2"] and team["members"] == 0

    assert_openai_error(
        c.post("/admin/teams", json={"name": "research"}, headers=ADMIN), 409, code="conflict"
    )
    for hostile, param in [
        ({"name": ""}, "name"),
        ({"name": "x" * 300}, "name"),
        ({"name": "a", "rpm": -1}, "rpm"),
        ({"name": "a", "rpm": "ten"}, None),
        ({"name": "a", "daily_spend": -0.5}, "daily_spend"),
        ({"name": "a", "daily_spend": 1e300}, "daily_spend"),
        ({"name": "a", "groups": "not-a-list"}, None),
        ({"name": "a", "groups": [""]}, None),
        ({"name": "a", "colour": "red"}, "colour"),
        ({"name": "a", "rpm": True}, None),
        ({"name": "a\x00b"}, None),
    ]:
        err = assert_openai_error(c.post("/admin/teams", json=hostile, headers=ADMIN), 400)
        if param is not None:
            assert err["param"] == param, (hostile, err)
    assert_openai_error(c.post("/admin/teams", json={"name": "x"}), 401)

    by_name = c.get("/admin/teams/research", headers=ADMIN).json()
    assert by_name["id"] == team["id"] and by_name["users"] == [] and by_name["keys"] == []
    r = c.patch(f"/admin/teams/{team['id']}", json={"rpm": None, "daily_tokens": 9000}, headers=ADMIN)
    assert r.status_code == 200 and (r.json()["rpm"], r.json()["daily_tokens"]) == (None, 9000)
    assert [t["name"] for t in c.get("/admin/teams", headers=ADMIN).json()["data"]] == ["research"]
    c.post("/admin/teams", json={"name": "other"}, headers=ADMIN)
    assert_openai_error(
        c.patch("/admin/teams/other", json={"name": "research"}, headers=ADMIN), 409, code="conflict"
    )

    # keys of a team: unknown teams and users are 404s; a team with keys is not deleted
    assert_openai_error(
        c.post("/admin/keys", json={"name": "k", "team": "nope"}, headers=ADMIN), 404, code="team_not_found"
    )
    assert_openai_error(
        c.post("/admin/keys", json={"name": "k", "user": "nobody@example.com"}, headers=ADMIN),
        404,
        code="user_not_found",
    )
    assert_openai_error(c.post("/admin/keys", json={"name": "k", "trusted_ui": "yes"}, headers=ADMIN), 400)
    key = create_key(c, "k", team="research", trusted_ui=True)
    assert (key["team"], key["user"], key["trusted_ui"]) == (team["id"], None, True)
    assert_openai_error(c.delete("/admin/teams/research", headers=ADMIN), 409, code="team_has_keys")
    c.patch(f"/admin/keys/{key['id']}", json={"team": None}, headers=ADMIN)
    r = c.delete("/admin/teams/research", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"id": team["id"], "object": "team.deleted", "deleted": True}
    assert_openai_error(c.get(f"/admin/teams/{team['id']}", headers=ADMIN), 404, code="team_not_found")
    assert_openai_error(c.patch("/admin/users/nobody", json={}, headers=ADMIN), 404, code="user_not_found")


def test_users_are_listed_and_edited_with_their_memberships(serve, http, sqlite_url) -> None:
    c = http(serve())
    c.post("/admin/teams", json={"name": "ops"}, headers=ADMIN)
    key = create_key(c, "ui", trusted_ui=True)["key"]
    named = {
        "X-OpenWebUI-User-Id": "u-17",
        "X-OpenWebUI-User-Email": "ada@example.com",
        "X-OpenWebUI-User-Name": "Ada",
    }
    assert c.post(CHAT, json=chat(), headers={**bearer(key), **named}).status_code == 200
    users = c.get("/admin/users", headers=ADMIN).json()["data"]
    assert len(users) == 1
    user = users[0]
    assert (user["subject"], user["email"], user["name"], user["teams"]) == (
        "u-17",
        "ada@example.com",
        "Ada",
        [],
    )
    assert user["issuer"].startswith("urn:llm-backend:trusted-ui:key_")
    r = c.patch(
        "/admin/users/ada@example.com",
        json={"teams": ["ops"], "admin_of": ["ops"], "daily_tokens": 100000, "daily_spend": 1.5},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert r.json()["teams"] == [
        {"id": r.json()["teams"][0]["id"], "name": "ops", "role": "admin", "source": ["admin"]}
    ]
    assert r.json()["daily_spend"] == 1.5
    assert [u["id"] for u in c.get("/admin/users?team=ops", headers=ADMIN).json()["data"]] == [user["id"]]
    assert c.get(f"/admin/users/{user['id']}", headers=ADMIN).json()["daily_tokens"] == 100000
    for hostile in ({"rpm": -3}, {"teams": ["no-such-team"]}, {"enabled": "no"}, {"role": "god"}):
        assert c.patch(f"/admin/users/{user['id']}", json=hostile, headers=ADMIN).status_code in (400, 404)
    # a disabled user's requests are refused, whichever front-end names them
    c.patch(f"/admin/users/{user['id']}", json={"enabled": False}, headers=ADMIN)
    assert_openai_error(
        c.post(CHAT, json=chat(), headers={**bearer(key), **named}), 403, code="user_disabled"
    )


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_BACKEND_", "REDIS_"))}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False
    )


def cli_json(database_url: str, *args: str) -> Any:
    proc = run_cli(database_url, *args)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def test_teams_and_users_from_the_cli(db_url) -> None:
    team = cli_json(
        db_url,
        "teams",
        "create",
        "--name",
        "research",
        "--models",
        "m,other",
        "--rpm",
        "60",
        "--tpm",
        "9000",
        "--max-parallel",
        "4",
        "--daily-tokens",
        "100000",
        "--monthly-tokens",
        "2000000",
        "--daily-spend",
        "2.50",
        "--monthly-spend",
        "40",
        "--groups",
        "g1,g2",
        "--json",
    )
    assert (team["models"], team["max_parallel"], team["daily_spend"], team["groups"]) == (
        ["m", "other"],
        4,
        2.5,
        ["g1", "g2"],
    )
    dup = run_cli(db_url, "teams", "create", "--name", "research")
    assert dup.returncode != 0 and "exists already" in dup.stderr and "Traceback" not in dup.stderr
    bad = run_cli(db_url, "teams", "create", "--name", "x", "--daily-spend", "lots")
    assert bad.returncode != 0 and "daily_spend" in bad.stderr
    listed = run_cli(db_url, "teams", "list")
    assert listed.returncode == 0 and "research" in listed.stdout
    updated = cli_json(
        db_url, "teams", "update", "research", "--rpm", "-1", "--daily-spend", "none", "--json"
    )
    assert (updated["rpm"], updated["daily_spend"]) == (None, None)
    shown = cli_json(db_url, "teams", "show", "research")
    assert shown["id"] == team["id"]

    key = run_cli(db_url, "keys", "create", "--name", "ui", "--team", "research", "--trusted-ui", "--json")
    assert key.returncode == 0, key.stderr
    info = json.loads(key.stdout)
    assert (info["team"], info["trusted_ui"]) == (team["id"], True)
    missing = run_cli(db_url, "keys", "create", "--name", "k", "--team", "nope")
    assert missing.returncode != 0 and "No team" in missing.stderr

    assert run_cli(db_url, "users", "list").returncode == 0
    refused = run_cli(db_url, "teams", "delete", "research")
    assert refused.returncode != 0 and "API key" in refused.stderr
    run_cli(db_url, "keys", "delete", info["id"])
    assert run_cli(db_url, "teams", "delete", "research").returncode == 0
    assert cli_json(db_url, "teams", "list", "--json") == []


def test_users_from_the_cli(sqlite_url) -> None:
    from llm_backend.services.org import OrgStore

    engine = make_engine(sqlite_url)
    try:
        store = OrgStore(engine)
        store.create_team({"name": "ml", "groups": ["g-ml"]})
        member = store.resolve_user(
            subject="oid-1",
            issuer="https://login.example/t/v2.0",
            email="bo@example.com",
            name="Bo",
            groups=["g-ml", "g-other"],
        )
    finally:
        engine.dispose()
    user = cli_json(sqlite_url, "users", "show", "bo@example.com")
    assert user["id"] == member.user_id
    assert user["teams"][0]["source"] == ["groups"]
    updated = cli_json(
        sqlite_url,
        "users",
        "update",
        member.user_id,
        "--daily-tokens",
        "500",
        "--admin-of",
        "ml",
        "--disable",
        "--json",
    )
    assert (updated["daily_tokens"], updated["enabled"], updated["teams"][0]["role"]) == (500, False, "admin")
    assert updated["teams"][0]["source"] == ["groups"]
    assert "bo@example.com" in run_cli(sqlite_url, "users", "list").stdout
    assert run_cli(sqlite_url, "users", "show", "nobody").returncode != 0


def test_group_claims_keep_memberships_in_sync(sqlite_url) -> None:
    from llm_backend.services.org import OrgStore

    engine = make_engine(sqlite_url)
    try:
        store = OrgStore(engine)
        a = store.create_team({"name": "a", "groups": ["ga"], "rpm": 5})
        b = store.create_team({"name": "b", "groups": ["gb"]})
        m = store.resolve_user(subject="s", issuer="https://iss", groups=["ga", "gb"])
        assert set(m.team_ids) == {a["id"], b["id"]} and m.team_id == a["id"]  # first by name
        assert [lv.kind for lv in m.levels] == ["user", "team"] and m.levels[1].limits.rpm == 5
        store.update_user(m.user_id, {"teams": ["b"]})  # an admin assigns b too
        m = store.resolve_user(subject="s", issuer="https://iss", groups=[])
        assert m.team_ids == (b["id"],)  # the group membership of a went; the assignment to b stayed
        m = store.resolve_user(subject="s", issuer="https://iss", groups=None)  # no group claim: kept
        assert m.team_ids == (b["id"],)
        same = store.resolve_user(subject="s", issuer="https://other-iss", groups=["ga"])
        assert same.user_id != m.user_id  # a subject is unique within its issuer only
        with pytest.raises(Exception, match="subject"):
            store.resolve_user(subject="", issuer="https://iss")
    finally:
        engine.dispose()


def test_migration_keeps_existing_keys_working(tmp_path: Path, serve, http) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url, "0004")
    from llm_backend.db.repositories import hash_api_key

    secret = "sk-llmb-" + "A" * 43
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, name, key_prefix, key_hash, rpm, enabled, created_at) "
                "VALUES ('key_old', 'old', 'sk-llmb-AAAA', :h, 1, 1, '2026-01-01 00:00:00.000000')"
            ),
            {"h": hash_api_key(secret)},
        )
    engine.dispose()
    migrate.upgrade(url)
    c = http(serve(database_url=url))
    key = c.get("/admin/keys/key_old", headers=ADMIN).json()
    assert (key["team"], key["user"], key["trusted_ui"], key["rpm"]) == (None, None, False, 1)
    assert c.post(CHAT, json=chat(), headers=bearer(secret)).status_code == 200
    err = assert_openai_error(
        c.post(CHAT, json=chat(), headers=bearer(secret)), 429, code="rate_limit_exceeded"
    )
    assert err["param"] == "key"
