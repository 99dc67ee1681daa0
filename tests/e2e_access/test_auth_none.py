"""LLM_BACKEND_AUTH=none: open for local development with a loud warning; the admin routes stay guarded."""

from __future__ import annotations

import logging

from llm_backend.config import Settings
from tests.e2e_access.conftest import (
    ADMIN,
    MESSAGES,
    REPO,
    assert_openai_error,
    bearer,
    chat,
    create_key,
)

DEMO = {"LLM_BACKEND_CONFIG": str(REPO / "config" / "demo.yaml")}


def test_auth_is_on_by_default_and_none_by_setting():
    assert Settings.from_env(DEMO).auth == "keys"
    assert Settings.from_env({**DEMO, "LLM_BACKEND_AUTH": "none"}).auth == "none"
    assert Settings.from_env({**DEMO, "LLM_BACKEND_AUTH": "NONE"}).auth == "none"


def test_open_without_keys_with_a_warning_at_start(serve, http, caplog):
    caplog.set_level(logging.INFO)
    c = http(serve(auth="none"))
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "LLM_BACKEND_AUTH=none" in r.getMessage()
    ]
    assert warnings, [r.getMessage() for r in caplog.records]

    r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    assert c.post("/v1/chat/completions", json=chat(stream=True)).status_code == 200
    assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["m", "other"]
    assert c.post("/v1/embeddings", json={"model": "m", "input": "hi"}).status_code == 200
    azure = c.post(
        "/openai/deployments/m/chat/completions?api-version=2024-10-21", json={"messages": MESSAGES}
    )
    assert azure.status_code == 200, azure.text
    # whatever key a client happens to send is not checked
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer("sk-anything")).status_code == 200
    assert c.post("/v1/chat/completions", json=chat(), headers={"api-key": "x"}).status_code == 200


def test_admin_routes_still_need_the_admin_key(serve, http):
    c = http(serve(auth="none"))
    for method, path in (("GET", "/admin/keys"), ("GET", "/admin/usage"), ("GET", "/admin/backends")):
        assert_openai_error(c.request(method, path), 401, code="invalid_api_key")
        assert_openai_error(c.request(method, path, headers=bearer("sk-llmb-" + "a" * 43)), 401)
        assert c.request(method, path, headers=ADMIN).status_code == 200
    assert_openai_error(c.post("/admin/keys", json={"name": "x"}), 401)
    assert c.get("/admin/keys", headers=ADMIN).json()["data"] == []
    # keys can be prepared while open; as documented, no limits apply while auth is off
    key = create_key(c, rpm=1)["key"]
    assert [
        c.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code for _ in range(3)
    ] == [200] * 3


def test_auth_none_without_admin_key_disables_admin(serve, http):
    c = http(serve(auth="none", admin_key=None))
    assert c.post("/v1/chat/completions", json=chat()).status_code == 200
    assert c.get("/admin/keys").status_code == 401
    assert_openai_error(c.get("/admin/keys", headers=bearer("whatever")), 403, code="admin_disabled")
