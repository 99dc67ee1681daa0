"""Request ids, health, the spec and docs, metrics, the access log line and client disconnects."""

from __future__ import annotations

import logging
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer

from tests.conftest import (
    AZURE_CHAT_PATH,
    UPSTREAM_KEY,
    USER_MESSAGES,
    assert_openai_error,
    azure_chat_completion,
    mock_model,
)

CHAT = {"model": "mock", "messages": USER_MESSAGES}


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llm_backend.access"]


# -- request ids --------------------------------------------------------------------------------------------


def test_request_id_is_honoured(client) -> None:
    # the client's id is echoed beside ours, never in its place
    r = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "my-trace.id:42"})
    assert r.status_code == 200
    assert r.headers["x-client-request-id"] == "my-trace.id:42"
    assert r.headers["x-request-id"].startswith("req_")


def test_request_id_is_generated_when_absent_or_unusable(client) -> None:
    a = client.post("/v1/chat/completions", json=CHAT).headers["x-request-id"]
    b = client.post("/v1/chat/completions", json=CHAT).headers["x-request-id"]
    assert a and b and a != b
    bad = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "has spaces <script>"})
    assert bad.headers["x-request-id"] != "has spaces <script>"
    assert re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", bad.headers["x-request-id"])
    long = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "x" * 600})
    assert long.headers["x-request-id"] != "x" * 600
    assert long.headers["x-client-request-id"] == "x" * 512  # bounded as OpenAI bounds X-Client-Request-Id


def test_request_id_on_errors_streams_and_health(make_client) -> None:
    client = make_client(max_body_bytes=512)
    headers = {"X-Request-Id": "rid-1"}
    echoed = "x-client-request-id"
    assert (
        client.post("/v1/chat/completions", json={"model": "x"}, headers=headers).headers[echoed] == "rid-1"
    )
    assert client.get("/nowhere", headers=headers).headers[echoed] == "rid-1"
    big = {"model": "mock", "messages": [{"role": "user", "content": "y" * 1000}]}
    assert client.post("/v1/chat/completions", json=big, headers=headers).headers[echoed] == "rid-1"
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    assert streamed.headers[echoed] == "rid-1"
    assert streamed.headers["x-request-id"].startswith("req_")
    assert client.get("/healthz", headers=headers).headers[echoed] == "rid-1"


# -- health, spec, docs, metrics ----------------------------------------------------------------------------


def test_healthz_and_readyz(make_client, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/ready.db"
    client = make_client(database_url=url)
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    # the schema is not migrated yet: not ready, and the check says what to run
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not ready"
    assert body["checks"]["models"]["ok"] is True
    failing = [c for c in body["checks"].values() if not c["ok"]]
    assert failing and "migrate" in failing[0]["message"]
    # serving does not depend on readiness
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200

    from llm_backend.db import migrate

    migrate.upgrade(url)
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert all(c["ok"] for c in r.json()["checks"].values())


def test_openapi_json_is_our_spec(client) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["info"]["title"] == "llm-backend"
    ops = {
        op["operationId"] for item in spec["paths"].values() for op in item.values() if isinstance(op, dict)
    }
    assert {
        "llm_backend.api.chat.create_chat_completion",
        "llm_backend.api.completions.create_completion",
        "llm_backend.api.embeddings.create_embedding",
        "llm_backend.api.models.list_models",
        "llm_backend.api.models.retrieve_model",
        "llm_backend.api.azure.create_chat_completion",
        "llm_backend.api.azure.create_completion",
        "llm_backend.api.azure.create_embedding",
        "llm_backend.api.azure.list_deployments",
        "llm_backend.api.azure.list_models",
        "llm_backend.api.health.healthz",
        "llm_backend.api.health.readyz",
    } <= ops
    for path in ("/v1/chat/completions", "/openai/deployments/{deployment}/chat/completions", "/healthz"):
        assert path in spec["paths"]
    schemes = spec["components"]["securitySchemes"]
    kinds = {(s["type"], s.get("scheme"), s.get("name"), s.get("in")) for s in schemes.values()}
    assert ("http", "bearer", None, None) in kinds
    assert ("apiKey", None, "api-key", "header") in kinds


def test_docs_serve_swagger_ui(client) -> None:
    r = client.get("/docs/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "swagger" in r.text.lower()
    assert client.get("/docs", follow_redirects=True).status_code == 200


def test_metrics(client) -> None:
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json={"model": "nope", "messages": USER_MESSAGES})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE llm_backend_requests_total counter" in text
    samples = [
        s.labels
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llm_backend_requests_total"
        and s.labels["route"] == "/v1/chat/completions"
        and (s.labels["status"], s.labels["model"], s.value) in (("200", "mock", 1), ("404", "other", 1))
    ]
    assert len(samples) == 2, text
    assert "llm_backend_request_duration_seconds" in text


def test_metrics_route_label_of_azure_chat(client) -> None:
    client.post(
        "/openai/deployments/mock/chat/completions?api-version=2024-10-21", json={"messages": USER_MESSAGES}
    )
    text = client.get("/metrics").text
    assert 'route="/openai/deployments/{deployment}/chat/completions"' in text


# -- the access log line --------------------------------------------------------------------------------------


def test_one_access_line_per_request(client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": "log-1"})
    lines = [r for r in access_records(caplog) if getattr(r, "client_request_id", None) == "log-1"]
    assert len(lines) == 1
    rec = lines[0]
    assert rec.status == 200  # type: ignore[attr-defined]
    assert rec.model == "mock"  # type: ignore[attr-defined]
    assert rec.stream is True  # type: ignore[attr-defined]
    assert rec.backend == "mock-mock"  # type: ignore[attr-defined]
    assert rec.outcome == "ok"  # type: ignore[attr-defined]
    assert isinstance(rec.latency_ms, float)  # type: ignore[attr-defined]


def test_secrets_never_logged(azure_client, httpserver: HTTPServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(azure_chat_completion())
    azure_client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": USER_MESSAGES},
        headers={"Authorization": "Bearer sk-client-secret"},
    )
    httpserver.clear()
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(
        {"error": {"code": "401", "message": f"invalid subscription key {UPSTREAM_KEY}"}}, status=401
    )
    r = azure_client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER_MESSAGES})
    assert_openai_error(r, 502)
    everything = caplog.text + " ".join(str(rec.__dict__) for rec in caplog.records)
    assert UPSTREAM_KEY not in everything
    assert "sk-client-secret" not in everything


# -- client disconnect ----------------------------------------------------------------------------------------


def test_client_disconnect_mid_stream_closes_the_relay(serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    url = serve([mock_model(delay_ms=100)])  # ~25 tokens: a few seconds if read to the end
    body = {**CHAT, "stream": True}
    with httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "gone-1"}) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            assert first.startswith(b"data: ")
        # the stream is closed here, long before the mock finished
        deadline = time.monotonic() + 30
        lines: list[logging.LogRecord] = []
        while time.monotonic() < deadline and not lines:
            lines = [
                rec for rec in access_records(caplog) if getattr(rec, "client_request_id", None) == "gone-1"
            ]
            time.sleep(0.02)
        assert lines, "the request never finished after the client went away"
        assert lines[0].outcome == "client_disconnected"  # type: ignore[attr-defined]
        # the server goes on serving
        assert http.get("/healthz").status_code == 200
        ok = http.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_cors_preflight_and_exposed_headers(client) -> None:
    """A browser UI on another origin may call the API with a bearer key and read our headers."""
    pre = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = client.post(
        "/v1/chat/completions",
        headers={"Origin": "http://ui.example"},
        json={"model": "mock", "messages": USER_MESSAGES},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    assert 'route="/v1/chat/completions",status="200"' in client.get("/metrics").text
    assert "OPTIONS" not in client.get("/metrics").text


def test_cors_can_be_switched_off(make_client) -> None:
    c = make_client(cors_allow_origins=())
    r = c.post(
        "/v1/chat/completions",
        headers={"Origin": "http://ui.example"},
        json={"model": "mock", "messages": USER_MESSAGES},
    )
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
