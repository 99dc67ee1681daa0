"""A token's caller is a user: created at first sight, placed in the teams its groups map to, held to
their limits; group overage refused where groups matter."""

from __future__ import annotations

from typing import Any

from llm_backend.app import create_app
from llm_backend.db.session import make_engine
from llm_backend.services.org import OrgStore
from tests.oidc.conftest import CHAT, bearer
from tests.oidc.support import Issuer, assert_openai_error, request_log

ADA = "0a0a0a0a-0000-4000-8000-00000000ada0"
OVERAGE = {"groups": None, "_claim_names": {"groups": "src1"}, "_claim_sources": {"src1": {"endpoint": "x"}}}


def org(db_url: str) -> OrgStore:
    return OrgStore(make_engine(db_url))


def test_token_caller_becomes_a_user_of_its_groups_teams(issuer: Issuer, make_settings: Any) -> None:
    settings = make_settings(issuer.settings())
    store = org(settings.database_url)
    team = store.create_team({"name": "engineering", "groups": ["g-engineering"], "rpm": 2})
    store.create_team({"name": "finance", "groups": ["g-finance"]})
    token = issuer.token()
    with create_app(settings).test_client() as client:
        answers = [client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) for _ in range(3)]
    assert [a.status_code for a in answers[:2]] == [200, 200]
    refused = answers[2]
    assert_openai_error(refused, 429, words=["team"])
    assert refused.headers["x-ratelimit-level"] == "team"
    (user,) = store.list_users()
    assert (user["subject"], user["issuer"]) == (ADA, issuer.issuer)
    assert (user["email"], user["name"]) == ("ada@example.org", "Ada Lovelace")
    assert [t["name"] for t in user["teams"]] == ["engineering"]
    rows = request_log(settings.database_url)
    ok = [r for r in rows if r["status_code"] == 200]
    assert len(ok) == 2
    assert all(r["user_id"] == user["id"] and r["team_id"] == team["id"] and r["user"] == ADA for r in ok)


def test_group_overage_is_refused_where_teams_map_groups(issuer: Issuer, make_settings: Any) -> None:
    settings = make_settings(issuer.settings())
    store = org(settings.database_url)
    store.create_team({"name": "engineering", "groups": ["g-engineering"]})
    tokens = [issuer.token(**OVERAGE), issuer.token(groups=None, hasgroups=True)]
    with create_app(settings).test_client() as client:
        answers = [client.post("/v1/chat/completions", json=CHAT, headers=bearer(t)) for t in tokens]
    for answer in answers:
        assert_openai_error(answer, 403, code="groups_overage", words=["groups", "too many"])
    assert store.list_users() == []
    assert request_log(settings.database_url) == []


def test_group_overage_is_accepted_without_group_mapped_teams(issuer: Issuer, make_settings: Any) -> None:
    settings = make_settings(issuer.settings())
    store = org(settings.database_url)
    store.create_team({"name": "no-groups", "rpm": 100})
    with create_app(settings).test_client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(issuer.token(**OVERAGE)))
    assert answer.status_code == 200, answer.text
    (user,) = store.list_users()
    assert user["subject"] == ADA


def test_disabled_user_is_refused(issuer: Issuer, make_settings: Any) -> None:
    settings = make_settings(issuer.settings())
    store = org(settings.database_url)
    token = issuer.token()
    with create_app(settings).test_client() as client:
        assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)).status_code == 200
    (user,) = store.list_users()
    store.update_user(user["id"], {"enabled": False})
    with create_app(settings).test_client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert_openai_error(answer, 403, code="user_disabled", words=["disabled"])


def test_v1_and_v2_tokens_of_one_user_are_one_user(issuer: Issuer, make_settings: Any) -> None:
    settings = make_settings(issuer.settings())
    with create_app(settings).test_client() as client:
        for token in (issuer.token(), issuer.v1_token(oid=ADA)):
            assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)).status_code == 200
    (user,) = org(settings.database_url).list_users()
    assert (user["subject"], user["issuer"]) == (ADA, issuer.issuer)
    assert {r["user_id"] for r in request_log(settings.database_url)} == {user["id"]}
