"""X-LLM-Backend-Team with keys: a trusted front-end's user in two teams chooses one per request (its
attribution, limits and models, through the real openai SDK); a key bound to a team may name only that team;
a key with neither team nor user, and the admin key, cannot name any."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.e2e_access.conftest import (
    ADMIN,
    assert_openai_error,
    bearer,
    chat,
    create_key,
    remember_key,
    table_rows,
)
from tests.e2e_access.conftest import (
    ADMIN_KEY as ADMIN_SECRET,
)

TEAM = "X-LLM-Backend-Team"
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi there"}]


def team(c: Any, name: str, **fields: Any) -> dict[str, Any]:
    r = c.post("/admin/teams", json={"name": name, **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    remember_key(f"team:{r.json()['id']}")
    return r.json()


def front_end(url: str, key: str, user: str, team: str | None = None) -> openai.OpenAI:
    headers = {"X-OpenWebUI-User-Id": user, "X-OpenWebUI-User-Email": f"{user}@example.com"}
    if team is not None:
        headers[TEAM] = team
    return openai.OpenAI(
        api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=60, default_headers=headers
    )


def test_a_front_ends_user_chooses_its_team(serve, http, limiter_redis_url, sqlite_url) -> None:
    url = serve(redis_url=limiter_redis_url, recording=True)
    c = http(url)
    alpha = team(c, "alpha")
    beta = team(c, "beta", rpm=1, models=["m"])
    gamma = team(c, "gamma")
    ui = create_key(c, "open-webui", trusted_ui=True)["key"]
    # the user exists once the front-end first names it; then the admin places it in two teams
    assert front_end(url, ui, "alice").chat.completions.create(model="m", messages=HI).choices
    (alice,) = c.get("/admin/users", headers=ADMIN).json()["data"]
    r = c.patch(f"/admin/users/{alice['id']}", json={"teams": ["alpha", "beta"]}, headers=ADMIN)
    assert r.status_code == 200, r.text

    assert front_end(url, ui, "alice").chat.completions.create(model="m", messages=HI).choices  # alpha
    chosen = front_end(url, ui, "alice", "beta")
    assert chosen.chat.completions.create(model="m", messages=HI).choices
    with pytest.raises(openai.RateLimitError) as limited:
        chosen.chat.completions.create(model="m", messages=HI)
    assert limited.value.body["param"] == "team"  # type: ignore[index]
    # beta allows only "m": the models list of a request for beta shows only it
    assert [m.id for m in chosen.models.list().data] == ["m"]
    assert front_end(url, ui, "alice", alpha["id"]).chat.completions.create(model="m", messages=HI).choices
    for other in ("gamma", "nobody-has-this-team"):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            front_end(url, ui, "alice", other).chat.completions.create(model="m", messages=HI)
        body: Any = refused.value.body
        assert (body["type"], body["param"], body["code"]) == ("permission_error", TEAM, "team_not_allowed")
    # bob is in no team: he can name none
    with pytest.raises(openai.PermissionDeniedError):
        front_end(url, ui, "bob", "alpha").chat.completions.create(model="m", messages=HI)
    serve.stop(url)
    rows = [r for r in table_rows(sqlite_url, "request_log") if r["user_id"] == alice["id"]]
    by_team: dict[Any, list[int]] = {}
    for row in rows:
        by_team.setdefault(row["team_id"], []).append(row["status_code"])
    assert sorted(by_team[alpha["id"]]) == [200, 200]
    assert sorted(by_team[beta["id"]]) == [200, 429]
    assert gamma["id"] not in by_team
    assert set(by_team.get(None, [])) <= {200, 403}  # the first request, before alice had teams; the 403s


def test_keys_name_only_their_own_team(serve, http) -> None:
    url = serve()
    c = http(url)
    lab = team(c, "lab")
    team(c, "other")
    bound = create_key(c, "bound", team="lab")["key"]
    plain = create_key(c, "plain")["key"]
    for value in ("lab", lab["id"]):
        r = c.post(CHAT, json=chat(), headers={**bearer(bound), TEAM: value})
        assert r.status_code == 200, r.text
    for key, value in ((bound, "other"), (bound, "missing"), (plain, "lab"), (ADMIN_SECRET, "lab")):
        err = assert_openai_error(c.post(CHAT, json=chat(), headers={**bearer(key), TEAM: value}), 403)
        assert (err["param"], err["code"]) == (TEAM, "team_not_allowed")
    # a team's name with accents arrives as its UTF-8 bytes
    team(c, "équipe")
    accented = create_key(c, "accented", team="équipe")["key"]
    r = c.post(CHAT, json=chat(), headers={**bearer(accented), TEAM: "équipe".encode()})
    assert r.status_code == 200, r.text
    # without the header, nothing changes for either
    assert c.post(CHAT, json=chat(), headers=bearer(plain)).status_code == 200
    assert c.post(CHAT, json=chat(), headers=bearer(bound)).status_code == 200
