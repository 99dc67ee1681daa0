"""Exact accounting end to end: every request through the app leaves one exact request_log row."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from werkzeug import Response

from tests.e2e_recording.conftest import (
    MODEL,
    FakeAzure,
    azure_model,
    completion,
    json_response,
    mock_model,
    request_rows,
    row_by_id,
    short_timeout,
    sse_response,
    stream_events,
    uvicorn_server,
    wait_for,
)

USAGE = {
    "prompt_tokens": 31,
    "completion_tokens": 17,
    "total_tokens": 48,
    "prompt_tokens_details": {"cached_tokens": 12, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 7, "audio_tokens": 0},
}
MESSAGES = [{"role": "user", "content": "Say hello"}]


def chat(c: Any, rid: str, **body: Any) -> Any:
    payload = {"model": MODEL, "messages": MESSAGES, **body}
    return c.post("/v1/chat/completions", json=payload, headers={"X-Request-Id": rid})


def test_non_streaming_tokens_equal_upstream_usage(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.answer("Hello there.", USAGE)
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        r = chat(c, "rid-json-1", user="alice@example.com")
        assert r.status_code == 200, r.text
        assert r.headers["x-client-request-id"] == "rid-json-1"
        generated = c.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert generated.status_code == 200
        generated_id = generated.headers["x-request-id"]
    row = row_by_id(db_url, "rid-json-1")
    assert row["status_code"] == 200 and row["outcome"] == "ok" and row["error_type"] is None
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (31, 17, 48)
    assert row["cached_tokens"] == 12
    assert row["reasoning_tokens"] == 7
    assert row["tokens_estimated"] is False
    assert row["stream"] is False
    assert row["route"] == "/v1/chat/completions" and row["operation"] == "chat"
    assert row["model_requested"] == MODEL and row["model"] == MODEL
    assert row["provider"] == "azure" and row["backend"] == "fake-azure" and row["deployment"] == "d"
    assert row["user"] == "alice@example.com"
    assert row["client_ip"] == "testclient"
    assert row["latency_ms"] > 0
    assert row["ttft_ms"] is None
    # our own request id, never the provider's
    generated_row = row_by_id(db_url, generated_id)
    assert generated_id.startswith("req_") and "chatcmpl" not in generated_id
    assert generated_row["user"] is None
    assert len(request_rows(db_url)) == 2


def test_streaming_with_usage_chunk_is_exact(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.reply = lambda body: sse_response(stream_events(("Hel", "lo", "!"), USAGE))
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        r = chat(c, "rid-stream-usage", stream=True)
        assert r.status_code == 200
        assert r.headers["x-client-request-id"] == "rid-stream-usage"
        assert b"data: [DONE]" in r.content
        # the proxy asked the upstream for the usage chunk, and did not pass it to a client that did not ask
        assert fake_azure.bodies[-1]["stream_options"] == {"include_usage": True}
        assert b'"usage"' not in r.content
    row = row_by_id(db_url, "rid-stream-usage")
    assert row["stream"] is True and row["outcome"] == "ok" and row["status_code"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (31, 17, 48)
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (12, 7)
    assert row["tokens_estimated"] is False
    assert row["ttft_ms"] is not None and row["ttft_ms"] > 0
    assert row["latency_ms"] >= row["ttft_ms"]


def test_streaming_without_usage_chunk_is_estimated(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    words = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog.")
    fake_azure.reply = lambda body: sse_response(stream_events(words, None))
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        r = chat(c, "rid-stream-nousage", stream=True, stream_options={"include_usage": True})
        assert r.status_code == 200
    row = row_by_id(db_url, "rid-stream-nousage")
    assert row["tokens_estimated"] is True
    assert row["outcome"] == "ok"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["cached_tokens"] is None and row["reasoning_tokens"] is None


def _slow(body: dict[str, Any]) -> Response:
    time.sleep(1.5)
    return json_response(completion("too late"))


FAILURES: list[tuple[str, Callable[[dict[str, Any]], Response], int, str]] = [
    (
        "429",
        lambda b: json_response(
            {"error": {"code": "429", "message": "Rate limit is exceeded. Try again in 7 seconds."}},
            429,
            {"Retry-After": "7"},
        ),
        429,
        "rate_limit_exceeded",
    ),
    (
        "500",
        lambda b: json_response(
            {"error": {"message": "The server had an error", "type": "server_error"}}, 500
        ),
        502,
        "upstream_error",
    ),
    (
        "content-filter",
        lambda b: json_response(
            {
                "error": {
                    "message": "The response was filtered due to the prompt triggering Azure OpenAI's policy.",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {}},
                }
            },
            400,
        ),
        400,
        "content_filter",
    ),
    ("timeout", _slow, 504, "upstream_timeout"),
]


def test_failed_upstream_requests_leave_rows(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    responders = {name: fn for name, fn, _, _ in FAILURES}
    current = {"name": ""}
    fake_azure.reply = lambda body: responders[current["name"]](body)
    # one app per failure: a 429 with Retry-After cools the backend down for the rest of the app's life
    for name, _, status, _ in FAILURES:
        current["name"] = name
        app = app_for(db_url, [azure_model(fake_azure.httpserver, timeout=short_timeout())])
        with app.test_client() as c:
            r = chat(c, f"rid-fail-{name}", user="bob")
            assert r.status_code == status, (name, r.text)
            assert r.headers["x-client-request-id"] == f"rid-fail-{name}"
            assert set(r.json()) == {"error"}
            if name == "429":
                # the backend now cools down: refused without an upstream call, and recorded as well
                cooled = chat(c, "rid-fail-cooldown", stream=True)
                assert cooled.status_code == 503, cooled.text
    for name, _, status, error_type in FAILURES:
        row = row_by_id(db_url, f"rid-fail-{name}")
        assert row["status_code"] == status, (name, row)
        assert row["outcome"] == "error", (name, row)
        assert row["error_type"] == error_type, (name, row)
        assert row["stream"] is False
        assert row["model_requested"] == MODEL and row["model"] == MODEL
        assert row["backend"] == "fake-azure"
        assert row["user"] == "bob"
        assert row["total_tokens"] == 0
        assert row["latency_ms"] > 0
    timed_out = row_by_id(db_url, "rid-fail-timeout")
    assert timed_out["latency_ms"] >= 400
    cooled_row = row_by_id(db_url, "rid-fail-cooldown")
    assert (cooled_row["status_code"], cooled_row["outcome"], cooled_row["stream"]) == (503, "error", True)
    assert cooled_row["error_type"] == "no_backend_available"
    assert len(request_rows(db_url)) == len(FAILURES) + 1


def test_validation_error_and_unknown_model_leave_rows(db_url: str, app_for: Callable[..., Any]) -> None:
    app = app_for(db_url, [mock_model()])
    with app.test_client() as c:
        bad = c.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": [{"role": "wizard", "content": "x"}], "user": "carol"},
            headers={"X-Request-Id": "rid-invalid"},
        )
        assert bad.status_code == 400, bad.text
        missing = c.post(
            "/v1/chat/completions", json={"model": "mock"}, headers={"X-Request-Id": "rid-missing"}
        )
        assert missing.status_code == 400
        unknown = c.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": MESSAGES},
            headers={"X-Request-Id": "rid-unknown"},
        )
        assert unknown.status_code == 404, unknown.text
        unknown_code = unknown.json()["error"]["code"]
    invalid = row_by_id(db_url, "rid-invalid")
    assert (invalid["status_code"], invalid["outcome"]) == (400, "error")
    assert invalid["error_type"]
    assert invalid["model_requested"] == "mock"
    assert invalid["route"] == "/v1/chat/completions" and invalid["operation"] == "chat"
    assert invalid["user"] == "carol"
    missing_row = row_by_id(db_url, "rid-missing")
    assert (missing_row["status_code"], missing_row["outcome"]) == (400, "error")
    unknown_row = row_by_id(db_url, "rid-unknown")
    assert (unknown_row["status_code"], unknown_row["outcome"]) == (404, "error")
    assert unknown_row["error_type"] == unknown_code
    assert unknown_row["model_requested"] == "no-such-model" and unknown_row["model"] is None
    assert len(request_rows(db_url)) == 3


def test_mock_model_stream_and_json_are_exact(db_url: str, app_for: Callable[..., Any]) -> None:
    app = app_for(db_url, [mock_model()])
    with app.test_client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": MESSAGES},
            headers={"X-Request-Id": "rid-mock-json"},
        )
        usage = r.json()["usage"]
        s = c.post(
            "/v1/chat/completions",
            json={
                "model": "mock",
                "messages": MESSAGES,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers={"X-Request-Id": "rid-mock-stream"},
        )
        frames = [orjson.loads(line[6:]) for line in s.text.split("\n\n") if line.startswith("data: {")]
        stream_usage = frames[-1]["usage"]
    for rid, u in (("rid-mock-json", usage), ("rid-mock-stream", stream_usage)):
        row = row_by_id(db_url, rid)
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
            u["prompt_tokens"],
            u["completion_tokens"],
            u["total_tokens"],
        )
        assert row["tokens_estimated"] is False
        assert row["provider"] == "mock"


def test_x_forwarded_for_only_from_trusted_proxies(db_url: str, app_for: Callable[..., Any]) -> None:
    headers = {"X-Forwarded-For": "203.0.113.9"}
    body = {"model": "mock", "messages": MESSAGES}
    untrusted = app_for(db_url, [mock_model()])
    with untrusted.test_client(client=("10.0.0.5", 40000)) as c:
        assert c.post(
            "/v1/chat/completions", json=body, headers={**headers, "X-Request-Id": "xff-1"}
        ).is_success
        assert c.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "xff-2"}).is_success
    trusted = app_for(db_url, [mock_model()], trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    with trusted.test_client(client=("10.0.0.5", 40000)) as c:
        assert c.post(
            "/v1/chat/completions", json=body, headers={**headers, "X-Request-Id": "xff-3"}
        ).is_success
        # a client that forges XFF through our proxy: the hop our proxy saw is the client
        forged = {"X-Forwarded-For": "198.51.100.1, 203.0.113.10"}
        assert c.post(
            "/v1/chat/completions", json=body, headers={**forged, "X-Request-Id": "xff-4"}
        ).is_success
    with trusted.test_client(client=("192.0.2.77", 40000)) as c:  # a peer that is not our proxy
        assert c.post(
            "/v1/chat/completions", json=body, headers={**headers, "X-Request-Id": "xff-5"}
        ).is_success
    assert row_by_id(db_url, "xff-1")["client_ip"] == "10.0.0.5"
    assert row_by_id(db_url, "xff-2")["client_ip"] == "10.0.0.5"
    assert row_by_id(db_url, "xff-3")["client_ip"] == "203.0.113.9"
    assert row_by_id(db_url, "xff-4")["client_ip"] == "203.0.113.10"
    assert row_by_id(db_url, "xff-5")["client_ip"] == "192.0.2.77"


def test_client_disconnect_mid_stream_leaves_a_row(db_url: str, app_for: Callable[..., Any]) -> None:
    """A real server: the client reads one chunk and closes; the row says so and counts what was generated."""
    app = app_for(db_url, [mock_model(delay_ms=100)])
    prompt = " ".join(f"word{i}" for i in range(12))
    with uvicorn_server(app) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "mock", "messages": [{"role": "user", "content": prompt}], "stream": True},
                headers={"X-Request-Id": "rid-disconnect"},
            ) as r:
                assert r.status_code == 200
                assert r.headers["x-client-request-id"] == "rid-disconnect"
                # read up to the first chunk that carries text, then hang up
                received = ""
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        delta = orjson.loads(line[6:])["choices"][0]["delta"]
                        received += delta.get("content") or ""
                        if received:
                            break
                assert received
            # the client is gone; the relay notices on its next write and records the request
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "mock", "messages": [{"role": "user", "content": prompt}], "stream": True},
                headers={"X-Request-Id": "rid-complete"},
            ) as full:
                full.read()
        wait_for(
            lambda: any(r["client_request_id"] == "rid-disconnect" for r in request_rows(db_url)), 60, "row"
        )
    row = row_by_id(db_url, "rid-disconnect")
    assert row["outcome"] == "client_disconnected", row
    assert row["error_type"] == "client_disconnected"
    assert row["stream"] is True
    assert row["client_ip"] == "127.0.0.1"
    complete = row_by_id(db_url, "rid-complete")
    assert complete["outcome"] == "ok" and complete["tokens_estimated"] is False
    # the partial completion is counted (estimated: the usage chunk never came), and is less than the whole
    assert row["tokens_estimated"] is True
    assert 0 < row["completion_tokens"] < complete["completion_tokens"], (row, complete)
    assert row["prompt_tokens"] > 0
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


def test_azure_style_route_and_embeddings_leave_rows(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.answer("Hello.", USAGE)
    app = app_for(db_url, [azure_model(fake_azure.httpserver), mock_model()])
    with app.test_client() as c:
        r = c.post(
            f"/openai/deployments/{MODEL}/chat/completions",
            params={"api-version": "2024-10-21"},
            json={"messages": MESSAGES},
            headers={"X-Request-Id": "rid-azure-route"},
        )
        assert r.status_code == 200, r.text
        e = c.post(
            "/v1/embeddings",
            json={"model": "mock", "input": ["one two three", "four"]},
            headers={"X-Request-Id": "rid-embed"},
        )
        assert e.status_code == 200, e.text
        embed_usage = e.json()["usage"]
    row = row_by_id(db_url, "rid-azure-route")
    assert row["route"] == f"/openai/deployments/{MODEL}/chat/completions"
    assert (row["model_requested"], row["model"], row["status_code"]) == (MODEL, MODEL, 200)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (31, 17, 12)
    embed = row_by_id(db_url, "rid-embed")
    assert embed["operation"] == "embeddings" and embed["outcome"] == "ok"
    assert (embed["prompt_tokens"], embed["total_tokens"]) == (
        embed_usage["prompt_tokens"],
        embed_usage["total_tokens"],
    )
    assert embed["tokens_estimated"] is False
