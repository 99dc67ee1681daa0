"""The Responses API and Azure's v1 API against fake upstreams: URLs, auth, bytes, streams, errors, usage."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest
from werkzeug import Request, Response

from llm_backend.config import BackendConfig, ModelConfig
from tests.conftest import assert_openai_error
from tests.e2e_recording.conftest import request_rows, wait_for
from tests.responses.conftest import (
    DEPLOYMENT,
    KEY,
    MODEL,
    PREVIEW,
    USAGE,
    Upstream,
    azure,
    event_blocks,
    event_stream,
    json_reply,
    response_object,
    sse_reply,
)

RAW = (
    b'{"model": "gpt-4o",  "input": "Say hello", "new_field_2027": {"nested": [1, 2.5, null]}, "store": true}'
)


def _row(url: str, operation: str = "responses", n: int = 1) -> dict[str, Any]:
    wait_for(lambda: len([r for r in request_rows(url) if r["operation"] == operation]) >= n, what="row")
    return [r for r in request_rows(url) if r["operation"] == operation][n - 1]


def _exact_usage(row: dict[str, Any]) -> None:
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (36, 87, 123)
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (12, 41)
    assert row["tokens_estimated"] is False


def test_openai_backend_gets_the_body_byte_for_byte(
    upstream: Upstream, make_app: Callable[..., Any], migrated: str
) -> None:
    answer = orjson.dumps(response_object()) + b"\n"
    upstream.on("/v1/responses", lambda r: Response(answer, content_type="application/json"))
    backend = BackendConfig(provider="openai", name="oai", base_url=upstream.url + "/v1", api_key="sk-up")
    with make_app(ModelConfig(name=MODEL, backends=(backend,))).test_client() as c:
        r = c.post("/v1/responses", content=RAW, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.content == answer, "the answer passes through as the upstream sent it"
    (request,) = upstream.requests
    assert request.path == "/v1/responses"
    assert upstream.bodies[0] == RAW, "forwarded byte for byte, unknown fields included"
    assert request.headers["Authorization"] == "Bearer sk-up"
    row = _row(migrated)
    _exact_usage(row)
    assert row["route"] == "/v1/responses" and row["outcome"] == "ok" and row["stream"] is False


def test_azure_v1_backend_urls_auth_and_deployment_as_model(
    upstream: Upstream, make_app: Callable[..., Any], migrated: str
) -> None:
    upstream.on("/openai/v1/responses", lambda r: json_reply(response_object()))
    chat = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    upstream.on("/openai/v1/chat/completions", lambda r: json_reply(chat))
    embedding = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    upstream.on("/openai/v1/embeddings", lambda r: json_reply(embedding))
    model = ModelConfig(name=MODEL, backends=(azure(upstream.server),))
    with make_app(model).test_client() as c:
        r = c.post("/v1/responses", content=RAW, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert (
            c.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
            ).status_code
            == 200
        )
        assert c.post("/v1/embeddings", json={"model": MODEL, "input": "x"}).status_code == 200
    paths = [(q.path, dict(q.args)) for q in upstream.requests]
    assert paths == [
        ("/openai/v1/responses", {}),
        ("/openai/v1/chat/completions", {}),
        ("/openai/v1/embeddings", {}),
    ]
    for q in upstream.requests:
        assert q.headers["Authorization"] == f"Bearer {KEY}"
    sent = [orjson.loads(b) for b in upstream.bodies]
    assert [b["model"] for b in sent] == [DEPLOYMENT] * 3, "the v1 API names the deployment in the body"
    assert sent[0]["new_field_2027"] == {"nested": [1, 2.5, None]} and sent[0]["input"] == "Say hello"
    _exact_usage(_row(migrated))


def test_azure_preview_version_uses_the_openai_responses_path(
    upstream: Upstream, make_app: Callable[..., Any]
) -> None:
    upstream.on("/openai/responses", lambda r: json_reply(response_object()))
    chat = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [], "usage": None}
    upstream.on(f"/openai/deployments/{DEPLOYMENT}/chat/completions", lambda r: json_reply(chat))
    model = ModelConfig(name=MODEL, backends=(azure(upstream.server, api_version=PREVIEW),))
    with make_app(model).test_client() as c:
        assert (
            c.post("/v1/responses", content=RAW, headers={"Content-Type": "application/json"}).status_code
            == 200
        )
        assert (
            c.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
            ).status_code
            == 200
        )
    responses, chat_request = upstream.requests
    assert responses.path == "/openai/responses" and responses.args["api-version"] == PREVIEW
    assert responses.headers["api-key"] == KEY and "Authorization" not in responses.headers
    assert orjson.loads(upstream.bodies[0])["model"] == DEPLOYMENT
    assert chat_request.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions", "deployment style stays"
    assert upstream.bodies[1] == orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )


def test_stream_passes_typed_events_through_exactly(
    upstream: Upstream, make_app: Callable[..., Any], migrated: str
) -> None:
    raw = event_stream(event_blocks())
    upstream.on("/openai/v1/responses", lambda r: sse_reply(raw))
    with make_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),))).test_client() as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content == raw, "every event passes as sent, `event:` lines included, nothing added"
    row = _row(migrated)
    _exact_usage(row)
    assert row["stream"] is True and row["outcome"] == "ok" and row["ttft_ms"] is not None


def test_stream_cut_midway_ends_with_an_error_event(
    upstream: Upstream, make_app: Callable[..., Any], migrated: str
) -> None:
    blocks = event_blocks()[:6]  # created … two deltas, then the connection ends

    def cut(request: Request) -> Response:
        def body() -> Any:
            for b in blocks:
                yield b + b"\n\n"
                time.sleep(0.01)

        return Response(body(), status=200, content_type="text/event-stream")

    upstream.on("/openai/v1/responses", cut)
    with make_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),))).test_client() as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    assert r.status_code == 200
    sent = event_stream(blocks)
    assert r.content.startswith(sent)
    tail = r.content[len(sent) :]
    assert tail.startswith(b"event: error\ndata: ") and tail.endswith(b"\n\n")
    error = orjson.loads(tail[len(b"event: error\ndata: ") :])
    assert error["type"] == "error" and error["code"] == "upstream_bad_response" and error["message"]
    assert error["sequence_number"] == 6
    row = _row(migrated)
    assert row["outcome"] == "error" and row["error_type"] == "upstream_bad_response"
    assert row["tokens_estimated"] is True and row["completion_tokens"] > 0


def test_response_failed_event_passes_through_and_is_recorded(
    upstream: Upstream, make_app: Callable[..., Any], migrated: str
) -> None:
    raw = event_stream(event_blocks(final="response.failed"))
    upstream.on("/openai/v1/responses", lambda r: sse_reply(raw))
    with make_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),))).test_client() as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    assert r.content == raw
    row = _row(migrated)
    assert row["outcome"] == "error" and row["error_type"] == "server_error"
    _exact_usage(row)


def test_upstream_429_keeps_retry_after(
    upstream: Upstream, make_app: Callable[..., Any], migrated: str
) -> None:
    body = {
        "error": {"code": "429", "message": "Requests to the Responses API have exceeded the rate limit."}
    }
    upstream.on("/openai/v1/responses", lambda r: json_reply(body, 429, {"Retry-After": "7"}))
    with make_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),), retries=0)).test_client() as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "Hi"})
    error = assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert "rate limit" in error["message"]
    assert r.headers["Retry-After"] == "7"
    row = _row(migrated)
    assert row["status_code"] == 429 and row["outcome"] == "error" and row["total_tokens"] == 0


def test_content_filter_error_passes_as_a_400(
    upstream: Upstream, make_app: Callable[..., Any], migrated: str
) -> None:
    body = {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {"violence": {"filtered": True, "severity": "high"}},
            },
        }
    }
    upstream.on("/openai/v1/responses", lambda r: json_reply(body, 400))
    with make_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),))).test_client() as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "something violent"})
    error = assert_openai_error(r, 400, code="content_filter")
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True
    assert len(upstream.requests) == 1, "the caller's answer: never retried elsewhere"
    assert _row(migrated)["error_type"] == "content_filter"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_through_the_gateway_to_azure_v1(
    upstream: Upstream, serve_app: Callable[..., str], migrated: str, stream: bool
) -> None:
    upstream.on(
        "/openai/v1/responses",
        lambda r: (
            sse_reply(event_stream(event_blocks()))
            if orjson.loads(r.get_data()).get("stream")
            else json_reply(response_object())
        ),
    )
    url = serve_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),)))
    client = openai.OpenAI(base_url=url + "/openai/v1/", api_key="anything")
    if stream:
        with client.responses.stream(model=MODEL, input="Hi") as events:
            kinds = [e.type for e in events]
            final = events.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    else:
        final = client.responses.create(model=MODEL, input="Hi")
    assert final.output_text == "Hello from upstream."
    assert final.usage is not None and final.usage.total_tokens == USAGE["total_tokens"]
    _exact_usage(_row(migrated))
