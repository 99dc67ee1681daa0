"""Errors are OpenAI-shaped everywhere: bad inputs, unknown models and routes, and every upstream failure."""

from __future__ import annotations

import time

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import ModelConfig, Timeouts
from tests.conftest import (
    AZURE_CHAT_PATH,
    UPSTREAM_KEY,
    USER_MESSAGES,
    assert_openai_error,
    azure_backend,
    azure_stream_chunks,
    closed_port_url,
    sse_body,
    sse_json,
)

M = USER_MESSAGES

BAD_INPUTS = [
    # (id, body, status, type, param, code)
    ("missing-model", {"messages": M}, 400, "invalid_request_error", "model", "missing_required_parameter"),
    (
        "missing-messages",
        {"model": "mock"},
        400,
        "invalid_request_error",
        "messages",
        "missing_required_parameter",
    ),
    (
        "empty-messages",
        {"model": "mock", "messages": []},
        400,
        "invalid_request_error",
        "messages",
        "empty_array",  # OpenAI's code for it
    ),
    (
        "messages-not-array",
        {"model": "mock", "messages": "hi"},
        400,
        "invalid_request_error",
        "messages",
        "invalid_type",
    ),
    (
        "bad-role",
        {"model": "mock", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "invalid_request_error",
        "messages.[0].role",
        "invalid_value",
    ),
    (
        "user-without-content",
        {"model": "mock", "messages": [{"role": "user"}]},
        400,
        "invalid_request_error",
        "messages.[0].content",
        "missing_required_parameter",
    ),
    (
        "content-wrong-type",
        {"model": "mock", "messages": [{"role": "user", "content": 5}]},
        400,
        "invalid_request_error",
        "messages.[0].content",
        "invalid_type",
    ),
    (
        "tool-without-tool_call_id",
        {"model": "mock", "messages": [*M, {"role": "tool", "content": "22C"}]},
        400,
        "invalid_request_error",
        "messages.[1].tool_call_id",
        "missing_required_parameter",
    ),
    (
        "temperature-hot",
        {"model": "mock", "messages": M, "temperature": "hot"},
        400,
        "invalid_request_error",
        "temperature",
        "invalid_type",
    ),
    (
        "n-zero",
        {"model": "mock", "messages": M, "n": 0},
        400,
        "invalid_request_error",
        "n",
        "integer_below_min_value",
    ),
    (
        "stream-yes",
        {"model": "mock", "messages": M, "stream": "yes"},
        400,
        "invalid_request_error",
        "stream",
        "invalid_type",
    ),
    (
        "max_tokens-negative",
        {"model": "mock", "messages": M, "max_tokens": -1},
        400,
        "invalid_request_error",
        "max_tokens",
        "integer_below_min_value",
    ),
    ("model-not-string", {"model": 5, "messages": M}, 400, "invalid_request_error", "model", "invalid_type"),
    ("body-is-array", [1, 2], 400, "invalid_request_error", None, "invalid_json"),
    (
        "unknown-model",
        {"model": "gpt-17", "messages": M},
        404,
        "invalid_request_error",
        "model",
        "model_not_found",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "type_", "param", "code"), [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS]
)
def test_bad_chat_inputs(client, body: object, status: int, type_: str, param: str | None, code: str) -> None:
    r = client.post(
        "/v1/chat/completions", content=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert_openai_error(r, status, type_=type_, param=param, code=code)
    assert r.headers["x-request-id"]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"model": "mock", "messages": [', id="truncated"),
        pytest.param(b"not json", id="garbage"),
        pytest.param(b'{"model": "mock",}', id="trailing-comma"),
    ],
)
def test_malformed_json(client, raw: bytes) -> None:
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, type_="invalid_request_error", param=None, code="invalid_json")


def test_empty_body(client) -> None:
    r = client.post("/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, type_="invalid_request_error", param=None)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "mock"}, "prompt"),
        ("/v1/embeddings", {"model": "mock"}, "input"),
        ("/openai/deployments/mock/chat/completions?api-version=2024-10-21", {}, "messages"),
        ("/openai/deployments/mock/embeddings?api-version=2024-10-21", {}, "input"),
    ],
)
def test_missing_required_on_other_routes(client, path: str, body: dict, param: str) -> None:
    r = client.post(path, json=body)
    assert_openai_error(r, 400, param=param, code="missing_required_parameter")


def test_unknown_model_on_every_route(client) -> None:
    cases = [
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
        ("POST", "/v1/embeddings", {"model": "nope", "input": "x"}),
        ("POST", "/v1/chat/completions", {"model": "nope", "messages": M, "stream": True}),
        ("POST", "/openai/deployments/nope/chat/completions?api-version=2024-10-21", {"messages": M}),
        ("GET", "/v1/models/nope", None),
    ]
    for method, path, body in cases:
        r = client.request(method, path, json=body)
        assert_openai_error(r, 404, code="model_not_found", param="model")


def test_body_over_the_limit(make_client) -> None:
    client = make_client(max_body_bytes=1024)
    small = client.post("/v1/chat/completions", json={"model": "mock", "messages": M})
    assert small.status_code == 200
    big = {"model": "mock", "messages": [{"role": "user", "content": "x" * 2000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert_openai_error(r, 413, type_="invalid_request_error", code="request_too_large")
    assert r.headers["x-request-id"]


def test_chunked_request_body(make_client) -> None:
    client = make_client(max_body_bytes=1024)

    def small():
        yield orjson.dumps({"model": "mock", "messages": M})

    def big():
        yield b'{"model":"mock","messages":[{"role":"user","content":"'
        yield b"x" * 2000
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=small(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", content=big(), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")


def test_unknown_route_and_method(client) -> None:
    r = client.get("/v1/nothing-here")
    err = assert_openai_error(r, 404, type_="invalid_request_error", code="unknown_url")
    assert "/v1/nothing-here" in err["message"]
    r = client.post("/v2/chat/completions", json={"model": "mock", "messages": M})
    assert_openai_error(r, 404, code="unknown_url")
    r = client.get("/v1/chat/completions")
    assert_openai_error(r, 405, code="method_not_allowed")


def test_wrong_content_type(client) -> None:
    r = client.post("/v1/chat/completions", content=b"model=mock", headers={"Content-Type": "text/plain"})
    assert r.status_code in (400, 415)
    assert_openai_error(r, r.status_code, type_="invalid_request_error")
    assert "problem" not in r.headers["content-type"]


# -- upstream failures -------------------------------------------------------------------------------------


def chat(client, stream: bool = False):
    body = {"model": "gpt-4o", "messages": M, "stream": stream}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer client-key"})


AZURE_429 = {
    "error": {
        "code": "429",
        "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
        "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 7 seconds.",
    }
}


def expect_429(httpserver: HTTPServer, headers: dict[str, str]) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(AZURE_429, status=429, headers=headers)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_429_keeps_retry_after(azure_client, httpserver: HTTPServer, stream: bool) -> None:
    expect_429(httpserver, {"Retry-After": "7", "x-ratelimit-remaining-requests": "0"})
    r = chat(azure_client, stream)
    assert r.status_code == 429
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["retry-after"] == "7"
    assert "retry after 7 seconds" in r.json()["error"]["message"]
    assert "Traceback" not in r.text and UPSTREAM_KEY not in r.text
    assert len(httpserver.log) == 1, "the SDK must not retry on its own"


def test_upstream_429_retry_after_ms(azure_client, httpserver: HTTPServer) -> None:
    expect_429(httpserver, {"retry-after-ms": "1500"})
    r = chat(azure_client)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"


def test_upstream_429_body_is_openai_shaped(azure_client, httpserver: HTTPServer) -> None:
    expect_429(httpserver, {"Retry-After": "7"})
    r = chat(azure_client)
    assert_openai_error(r, 429, type_="rate_limit_error")


CONTENT_FILTER_ERROR = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
        "policy. Please modify your prompt and retry.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": {"filtered": False, "severity": "safe"},
                "jailbreak": {"filtered": True, "detected": True},
                "self_harm": {"filtered": False, "severity": "safe"},
                "sexual": {"filtered": False, "severity": "safe"},
                "violence": {"filtered": True, "severity": "medium"},
            },
        },
    }
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_azure_content_filter_400(azure_client, httpserver: HTTPServer, stream: bool) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(CONTENT_FILTER_ERROR, status=400)
    r = chat(azure_client, stream)
    err = assert_openai_error(r, 400, code="content_filter", param="prompt")
    assert err["message"] == CONTENT_FILTER_ERROR["error"]["message"]
    assert err["innererror"] == CONTENT_FILTER_ERROR["error"]["innererror"]
    assert err["type"] == "invalid_request_error"


def test_upstream_plain_400_is_passed_through(azure_client, httpserver: HTTPServer) -> None:
    upstream = {
        "error": {
            "message": "Unrecognized request argument supplied: frobnicate",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(upstream, status=400)
    r = chat(azure_client)
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert err["message"] == upstream["error"]["message"]
    assert len(httpserver.log) == 1


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_auth_failure_is_502_without_the_key(
    azure_client, httpserver: HTTPServer, status: int, stream: bool
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(
        {
            "error": {
                "code": "401",
                "message": f"Access denied due to invalid subscription key {UPSTREAM_KEY} or wrong API endpoint.",
            }
        },
        status=status,
    )
    r = chat(azure_client, stream)
    err = assert_openai_error(r, 502, code="upstream_auth_failed")
    assert "credentials" in err["message"] and "server" in err["message"]
    assert UPSTREAM_KEY not in r.text
    assert "client-key" not in r.text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_500_is_502(azure_client, httpserver: HTTPServer, stream: bool) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(
        {"error": {"message": "The server had an error processing your request.", "type": "server_error"}},
        status=500,
    )
    r = chat(azure_client, stream)
    assert_openai_error(r, 502, type_="upstream_error")
    assert len(httpserver.log) == 1, "a single backend is tried once (the SDK does not retry)"


def test_upstream_html_503_is_502(azure_client, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_data(
        "<html><body>Service Unavailable</body></html>", status=503, content_type="text/html"
    )
    r = chat(azure_client)
    assert_openai_error(r, 502)
    assert "<html>" not in r.text


def test_upstream_malformed_json_200_is_502(azure_client, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_data(
        b'{"id": "chatcmpl-1", "choices": [', content_type="application/json"
    )
    r = chat(azure_client)
    assert_openai_error(r, 502, code="upstream_bad_response")


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_unreachable_is_502(
    make_client, httpserver: HTTPServer, transport: str, stream: bool
) -> None:
    backend = azure_backend(
        httpserver, endpoint=closed_port_url(), timeout=Timeouts(connect=2, first_byte=2, total=3)
    )
    client = make_client([ModelConfig(name="gpt-4o", backends=(backend,))], upstream_http_client=transport)
    r = chat(client, stream)
    assert_openai_error(r, 502, code="upstream_unreachable")


def _slow(seconds: float, body: bytes = b"{}"):
    def handler(request: Request) -> Response:
        time.sleep(seconds)
        return Response(body, content_type="application/json")

    return handler


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_timeout_is_504(make_client, httpserver: HTTPServer, transport: str, stream: bool) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_handler(_slow(1.5))
    backend = azure_backend(httpserver, timeout=Timeouts(connect=1, first_byte=0.3, total=0.5))
    model = ModelConfig(name="gpt-4o", backends=(backend,), retries=0)
    client = make_client([model], upstream_http_client=transport)
    r = chat(client, stream)
    assert_openai_error(r, 504, code="upstream_timeout", type_="timeout_error")


def test_upstream_stalls_mid_stream_ends_with_timeout_event(make_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()

    def handler(request: Request) -> Response:
        def gen():
            yield sse_body(*chunks[:3], done=False)
            time.sleep(1.5)
            yield sse_body(*chunks[3:])

        return Response(gen(), content_type="text/event-stream")

    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_handler(handler)
    backend = azure_backend(httpserver, timeout=Timeouts(connect=1, first_byte=0.3, total=0.5))
    client = make_client([ModelConfig(name="gpt-4o", backends=(backend,), retries=0)])
    r = chat(client, stream=True)
    assert r.status_code == 200
    events = sse_json(r.content)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["error"]["code"] == "upstream_timeout"


def test_upstream_garbage_body_leaks_nothing(azure_client, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_data(b"\x00\xff garbage", status=200)
    r = azure_client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": M})
    assert_openai_error(r, 502, code="upstream_bad_response")


def test_sse_body_helper_roundtrip() -> None:
    assert sse_json(sse_body({"a": 1})) == [{"a": 1}]


def test_stream_trickling_past_its_total_timeout_ends_with_timeout_event(
    make_client, httpserver: HTTPServer
) -> None:
    """Each chunk arrives within first_byte, but the whole stream would outlast `total`."""
    chunks = azure_stream_chunks()

    def handler(request: Request) -> Response:
        def gen():
            for _ in range(12):
                yield sse_body(chunks[1], done=False)
                time.sleep(0.15)
            yield sse_body(*chunks[2:])

        return Response(gen(), content_type="text/event-stream")

    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_handler(handler)
    backend = azure_backend(httpserver, timeout=Timeouts(connect=1, first_byte=1.0, total=0.8))
    client = make_client([ModelConfig(name="gpt-4o", backends=(backend,), retries=0)])
    r = chat(client, stream=True)
    assert r.status_code == 200
    events = sse_json(r.content)
    assert 1 <= len([e for e in events if "choices" in e]) < 12
    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert "total timeout" in events[-1]["error"]["message"]
    assert r.content.endswith(b"data: [DONE]\n\n")
