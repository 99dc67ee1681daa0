"""A user in several teams chooses per request which one it counts for (X-LLM-Backend-Team): the real
openai SDK with an access token against a running server; the default team, a chosen team's limits, and a
team the user is not in (or that does not exist) refused with 403 and recorded under no team."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from llm_backend.app import create_app
from llm_backend.db.session import make_engine
from llm_backend.services.org import OrgStore
from tests.conftest import running_server
from tests.oidc.support import Issuer, request_log

TEAM = "X-LLM-Backend-Team"
HI = [{"role": "user", "content": "Hi there"}]


def sdk(url: str, token: str, team: str | None = None) -> openai.OpenAI:
    headers = {TEAM: team} if team is not None else None
    return openai.OpenAI(
        api_key=token, base_url=f"{url}/v1", max_retries=0, timeout=60, default_headers=headers
    )


def test_a_token_user_chooses_one_of_its_teams_per_request(issuer: Issuer, make_settings: Any) -> None:
    settings = make_settings(issuer.settings())
    store = OrgStore(make_engine(settings.database_url))
    alpha = store.create_team({"name": "alpha", "groups": ["g-alpha"]})
    beta = store.create_team({"name": "beta", "groups": ["g-beta"], "rpm": 1})
    gamma = store.create_team({"name": "gamma", "groups": ["g-gamma"]})
    token = issuer.token(groups=["g-alpha", "g-beta"])
    with running_server(create_app(settings)) as url:
        # no header: the first team by name
        assert sdk(url, token).chat.completions.create(model="m", messages=HI).choices
        # beta chosen by name: its rpm of 1 admits one request, then refuses, naming the team
        chosen = sdk(url, token, "beta")
        assert chosen.chat.completions.create(model="m", messages=HI).choices
        with pytest.raises(openai.RateLimitError) as limited:
            chosen.chat.completions.create(model="m", messages=HI)
        assert limited.value.response.headers["x-ratelimit-level"] == "team"
        # ... by id: the same team, the same counter
        with pytest.raises(openai.RateLimitError):
            sdk(url, token, beta["id"]).chat.completions.create(model="m", messages=HI)
        # alpha (the default, and chosen by id) is not held to beta's limit
        assert sdk(url, token).chat.completions.create(model="m", messages=HI).choices
        assert sdk(url, token, alpha["id"]).chat.completions.create(model="m", messages=HI).choices
        # a team the user is not in, and one that does not exist: the same 403
        bodies: list[Any] = []
        for other in ("gamma", gamma["id"], "no-such-team"):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                sdk(url, token, other).chat.completions.create(model="m", messages=HI)
            bodies.append(refused.value.body)
        assert all(b == bodies[0] for b in bodies), bodies
        assert (bodies[0]["type"], bodies[0]["param"], bodies[0]["code"]) == (
            "permission_error",
            TEAM,
            "team_not_allowed",
        )
        assert "gamma" not in bodies[0]["message"]
        # the models list of a chosen team works too; a foreign team's is refused alike
        assert [m.id for m in sdk(url, token, "beta").models.list().data] == ["m"]
        with pytest.raises(openai.PermissionDeniedError):
            sdk(url, token, "gamma").models.list()
    (user,) = store.list_users()
    rows = request_log(settings.database_url)
    by_team: dict[Any, list[int]] = {}
    for row in rows:
        assert row["user_id"] == user["id"]
        by_team.setdefault(row["team_id"], []).append(row["status_code"])
    assert sorted(by_team[alpha["id"]]) == [200, 200, 200]
    assert sorted(by_team[beta["id"]]) == [200, 429, 429]
    assert gamma["id"] not in by_team
    assert set(by_team.get(None, [])) <= {403}


def test_a_team_by_another_users_membership_is_refused(issuer: Issuer, make_settings: Any) -> None:
    """Membership is per user: Ada's team is not Grace's to choose, though both are users here."""
    settings = make_settings(issuer.settings())
    store = OrgStore(make_engine(settings.database_url))
    store.create_team({"name": "alpha", "groups": ["g-alpha"]})
    store.create_team({"name": "beta", "groups": ["g-beta"]})
    ada = issuer.token(groups=["g-alpha"])
    grace = issuer.token(groups=["g-beta"], sub="sub-grace", oid="0b0b0b0b-0000-4000-8000-00000000ace0")
    with running_server(create_app(settings)) as url:
        assert sdk(url, ada, "alpha").chat.completions.create(model="m", messages=HI).choices
        assert sdk(url, grace, "beta").chat.completions.create(model="m", messages=HI).choices
        with pytest.raises(openai.PermissionDeniedError):
            sdk(url, grace, "alpha").chat.completions.create(model="m", messages=HI)
