"""Unauthenticated junk: bounded metric labels, counted (not recorded) refusals, a protected /metrics."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from llm_backend.app import create_app
from llm_backend.db import migrate
from llm_backend.db.session import make_engine
from tests.conftest import mock_model

ADMIN_KEY = "adm-junk-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
METRICS_TOKEN = "metrics-junk-token"
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'junk.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def app_client(make_settings: Callable[..., Any], db: str) -> Iterator[Callable[..., Any]]:
    clients: list[Any] = []

    def make(**kw: Any) -> Any:
        settings = make_settings(
            [mock_model(aliases=("gpt-4o",))],
            auth="keys",
            recording=True,
            admin_key=ADMIN_KEY,
            database_url=db,
            **kw,
        )
        client = create_app(settings).test_client()
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def request_log(db: str) -> list[dict[str, Any]]:
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM request_log"))]
    finally:
        engine.dispose()


def series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_junk_is_counted_not_recorded_and_labels_stay_bounded(
    app_client: Callable[..., Any], db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    c = app_client()
    noises = [uuid.uuid4().hex for _ in range(300)]
    for i, noise in enumerate(noises):
        if i in (50, 100):  # (the first scrape adds the series of /metrics itself)
            early = c.get("/metrics").text
        c.get(f"/v1/{noise}")
        c.post(f"/v1/{noise}/chat/completions", json=CHAT)
        c.post("/v1/chat/completions", json={**CHAT, "model": noise}, headers={"X-Conversation-Id": noise})
        c.get(f"/v1/models/{noise}", headers={"Authorization": f"Bearer sk-llmb-{noise}"})
        c.get(f"/api/conversations/{noise}")
        c.delete(f"/openai/deployments/{noise}/chat/completions")
    text = c.get("/metrics").text
    c.__exit__(None, None, None)  # drains the recorder

    assert request_log(db) == [], "refusals before authentication must not be recorded one row each"
    assert not any(noise in text for noise in noises)
    # the number of series does not grow with the junk (only the counts do)
    names = {line.rsplit(" ", 1)[0] for line in series(text)}
    assert names == {line.rsplit(" ", 1)[0] for line in series(early)}
    assert re.search(r'llm_backend_rejected_total\{[^}]*reason="unauthenticated"\} 900', text), text
    assert re.search(r'llm_backend_rejected_total\{[^}]*reason="unknown_route"\} 900', text), text
    # one summing-up line per kind of refusal, not one access line per request
    refusals = [r for r in caplog.records if "before authentication" in r.getMessage()]
    assert 1 <= len(refusals) <= 2, [r.getMessage() for r in refusals]
    access = [r for r in caplog.records if r.name == "llm_backend.access" and getattr(r, "status", None)]
    assert len(access) < 10, "junk requests wrote an access line each"


def test_metrics_labels_come_from_bounded_sets(app_client: Callable[..., Any]) -> None:
    c = app_client()
    key = c.post("/admin/keys", json={"name": "labels"}, headers=ADMIN).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    noises = [uuid.uuid4().hex for _ in range(200)]
    for noise in noises:
        c.get(f"/v1/{noise}")
        c.post("/v1/chat/completions", json={**CHAT, "model": noise}, headers=auth)
        c.get(f"/api/conversations/conv_{noise}", headers={**auth, "X-Conversation-Id": noise})
        c.get(f"/v1/models/{noise}", headers=auth)
    assert c.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    text = c.get("/metrics").text
    assert not any(noise in text for noise in noises)
    assert key not in text
    lines = series(text)
    assert len(lines) < 250, len(lines)  # ~160: histograms per route and model; 200 noises would be 800+
    routes = set(re.findall(r'route="([^"]*)"', text))
    assert routes <= {
        "other",
        "/v1/chat/completions",
        "/v1/models/{model}",
        "/api/conversations/{conversation_id}",
        "/admin/keys",
        "/metrics",
    }, routes
    models = set(re.findall(r'model="([^"]*)"', text))
    assert models <= {"", "mock", "other"}, models
    assert re.search(r'model="mock",[^}]*route="/v1/chat/completions",status="200"', text)
    assert re.search(r'model="other",[^}]*route="/v1/chat/completions",status="404"', text)
    assert re.search(r'llm_backend_rejected_total\{[^}]*reason="unknown_route"\} 200', text)


def test_listing_models_is_not_recorded_as_an_error(app_client: Callable[..., Any], db: str) -> None:
    c = app_client()
    key = c.post("/admin/keys", json={"name": "lister"}, headers=ADMIN).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    assert c.get("/v1/models", headers=auth).status_code == 200
    assert c.get("/v1/models/mock", headers=auth).status_code == 200
    assert c.get("/openai/deployments", headers=auth).status_code == 200
    assert c.get("/openai/models", headers=auth).status_code in (200, 404)
    assert c.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    assert c.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth).status_code == 404
    c.__exit__(None, None, None)
    rows = request_log(db)
    assert sorted((r["status_code"], r["outcome"]) for r in rows) == [(200, "ok"), (404, "error")], rows


def test_metrics_token_protects_the_metrics(app_client: Callable[..., Any]) -> None:
    c = app_client(metrics_token=METRICS_TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": METRICS_TOKEN}):
        r = c.get("/metrics", headers=headers)
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key" and METRICS_TOKEN not in r.text
    r = c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200
    assert "llm_backend_requests_total" in r.text
    assert 'reason="unauthenticated"' in r.text
