"""Streaming: exact SSE framing, Azure's first chunk and the usage chunk, pass-through, broken streams."""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import ModelConfig
from tests.conftest import (
    AZURE_CHAT_PATH,
    AZURE_FIRST_CHUNK,
    AZURE_USAGE,
    UPSTREAM_KEY,
    USER_MESSAGES,
    azure_stream_chunks,
    openai_backend,
    sse_body,
    sse_json,
    sse_payloads,
)

SSE = "text/event-stream"


def expect_stream(
    httpserver: HTTPServer, chunks: list, path: str = AZURE_CHAT_PATH, done: bool = True
) -> bytes:
    body = sse_body(*chunks, done=done)
    httpserver.expect_request(path, method="POST").respond_with_data(body, content_type=SSE)
    return body


def post_json(client, path: str, body: dict, **headers: str):
    return client.post(
        path, content=orjson.dumps(body), headers={"Content-Type": "application/json", **headers}
    )


def upstream_body(httpserver: HTTPServer) -> dict:
    assert len(httpserver.log) == 1
    return orjson.loads(httpserver.log[0][0].get_data())


def assert_sse_headers(response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"


def test_v1_stream_folds_azure_first_chunk_and_drops_usage(azure_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()
    expect_stream(httpserver, chunks)
    body = {"model": "gpt-4o", "messages": USER_MESSAGES, "stream": True, "unknown_knob": [1]}
    r = post_json(azure_client, "/v1/chat/completions", body, Authorization="Bearer client-key")
    assert_sse_headers(r)

    # exact framing: the role chunk merged with the prompt-filter chunk, then the upstream's bytes verbatim
    payloads = sse_payloads(r.content)
    assert payloads[-1] == b"[DONE]"
    folded = orjson.loads(payloads[0])
    assert folded == {**AZURE_FIRST_CHUNK, **chunks[1]}
    assert folded["prompt_filter_results"] == AZURE_FIRST_CHUNK["prompt_filter_results"]
    assert folded["id"] == chunks[1]["id"] and folded["object"] == "chat.completion.chunk"
    assert payloads[1:-1] == [orjson.dumps(c) for c in chunks[2:-1]]
    expected_tail = (
        b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks[2:-1]) + b"data: [DONE]\n\n"
    )
    assert r.content.endswith(expected_tail)

    events = sse_json(r.content)
    assert all(e["choices"] for e in events), "no client-visible chunk may have empty choices"
    assert not any("usage" in e for e in events)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == "Hello! How can I help?"

    # upstream got everything, plus stream_options.include_usage
    req = httpserver.log[0][0]
    assert req.path == AZURE_CHAT_PATH
    assert req.headers["api-key"] == UPSTREAM_KEY
    assert "client-key" not in str(req.headers)
    assert req.headers.get("Accept") == "text/event-stream"
    assert upstream_body(httpserver) == {**body, "stream_options": {"include_usage": True}}


def test_v1_stream_with_include_usage_gets_the_usage_chunk(azure_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()
    expect_stream(httpserver, chunks)
    body = {
        "model": "gpt-4o",
        "messages": USER_MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = orjson.dumps(body)
    r = azure_client.post("/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"})
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert events[-1] == chunks[-1]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == AZURE_USAGE
    assert all(e["choices"] for e in events[:-1])
    assert sse_payloads(r.content)[-2] == orjson.dumps(chunks[-1])
    assert httpserver.log[0][0].get_data() == sent


def test_include_usage_false_is_overridden_upstream_only(azure_client, httpserver: HTTPServer) -> None:
    expect_stream(httpserver, azure_stream_chunks())
    body = {
        "model": "gpt-4o",
        "messages": USER_MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": False, "future_option": "x"},
    }
    r = post_json(azure_client, "/v1/chat/completions", body)
    assert_sse_headers(r)
    assert not any("usage" in e for e in sse_json(r.content))
    assert upstream_body(httpserver)["stream_options"] == {"include_usage": True, "future_option": "x"}


def test_azure_route_stream_passes_first_chunk_through(azure_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()
    expect_stream(httpserver, chunks)
    body = {"messages": USER_MESSAGES, "stream": True}
    r = post_json(azure_client, "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", body)
    assert_sse_headers(r)
    # as Azure sent it, minus the usage chunk the client did not ask for
    assert r.content == sse_body(*chunks[:-1])
    assert upstream_body(httpserver) == {**body, "stream_options": {"include_usage": True}}


def test_azure_route_stream_with_usage_is_exactly_what_azure_sent(
    azure_client, httpserver: HTTPServer
) -> None:
    chunks = azure_stream_chunks()
    upstream = expect_stream(httpserver, chunks)
    body = {"messages": USER_MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    r = post_json(azure_client, "/openai/deployments/gpt-4-alias-free/chat/completions?api-version=x", body)
    assert r.status_code == 404  # the deployment in the path is the model name
    r = post_json(azure_client, "/openai/deployments/gpt-4/chat/completions?api-version=2024-10-21", body)
    assert_sse_headers(r)
    assert r.content == upstream


def tool_call_chunks() -> list[dict]:
    base = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}

    def c(delta: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    return [
        AZURE_FIRST_CHUNK,
        c(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            }
        ),
        c({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        c({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}]}),
        c({}, "tool_calls"),
        {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
    ]


def test_tool_call_stream_is_relayed(azure_client, httpserver: HTTPServer) -> None:
    chunks = tool_call_chunks()
    expect_stream(httpserver, chunks)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {
        "model": "gpt-4o",
        "messages": USER_MESSAGES,
        "stream": True,
        "tools": tools,
        "tool_choice": "auto",
    }
    r = post_json(azure_client, "/v1/chat/completions", body)
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert events[0] == {**AZURE_FIRST_CHUNK, **chunks[1]}
    assert events[1:] == chunks[2:-1]
    args = "".join(
        tc["function"].get("arguments", "")
        for e in events
        for tc in e["choices"][0]["delta"].get("tool_calls", [])
    )
    assert args == '{"city":"Paris"}'
    assert upstream_body(httpserver)["tools"] == tools


def test_n2_and_logprobs_stream_is_relayed(azure_client, httpserver: HTTPServer) -> None:
    base = {"id": "chatcmpl-n2", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    lp = {
        "content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}],
        "refusal": None,
    }
    chunks = [
        {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        },
        {
            **base,
            "choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        },
        {
            **base,
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": lp, "finish_reason": None}],
        },
        {
            **base,
            "choices": [{"index": 1, "delta": {"content": "Yo"}, "logprobs": lp, "finish_reason": None}],
        },
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]},
    ]
    upstream = expect_stream(httpserver, chunks)
    body = {
        "model": "gpt-4o",
        "messages": USER_MESSAGES,
        "stream": True,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 0,
    }
    r = post_json(azure_client, "/v1/chat/completions", body)
    assert_sse_headers(r)
    assert r.content == upstream
    sent = upstream_body(httpserver)
    assert sent["n"] == 2 and sent["logprobs"] is True and sent["top_logprobs"] == 0


def test_openai_provider_stream(make_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()[1:]
    expect_stream(httpserver, chunks, path="/v1/chat/completions")
    client = make_client([ModelConfig(name="gpt-4o-mini", backends=(openai_backend(httpserver),))])
    body = {"model": "gpt-4o-mini", "messages": USER_MESSAGES, "stream": True}
    r = post_json(client, "/v1/chat/completions", body, Authorization="Bearer client-key")
    assert_sse_headers(r)
    assert r.content == sse_body(*chunks[:-1])
    req = httpserver.log[0][0]
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer k"
    assert upstream_body(httpserver) == {**body, "stream_options": {"include_usage": True}}


def test_mock_stream_matches_non_stream_text(client) -> None:
    body = {"model": "mock", "messages": [{"role": "user", "content": "stream me"}]}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert all(e["object"] == "chat.completion.chunk" and e["choices"] for e in events)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == full
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({e["id"] for e in events}) == 1

    r = client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = sse_json(r.content)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0


def test_mock_completions_stream(client) -> None:
    r = client.post("/v1/completions", json={"model": "mock", "prompt": "once upon", "stream": True})
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert all(e["object"] == "text_completion" for e in events)
    assert "once upon" in "".join(e["choices"][0]["text"] for e in events)


def test_mock_azure_route_stream(client) -> None:
    r = client.post(
        "/openai/deployments/mock/chat/completions?api-version=2024-10-21",
        json={"messages": USER_MESSAGES, "stream": True},
    )
    assert_sse_headers(r)
    assert sse_json(r.content)


def _cut_handler(parts: list[bytes], *, raise_at_end: bool) -> object:
    def handler(request: Request) -> Response:
        def gen() -> Iterator[bytes]:
            for p in parts:
                yield p
                time.sleep(0.01)
            if raise_at_end:
                raise ConnectionError("upstream went away")

        return Response(gen(), content_type=SSE)

    return handler


def test_stream_cut_mid_way_ends_with_error_event_then_done(azure_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()
    parts = [sse_body(c, done=False) for c in chunks[:4]]
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_handler(_cut_handler(parts, raise_at_end=True))
    r = post_json(
        azure_client, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER_MESSAGES, "stream": True}
    )
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1].keys() == {"error"}
    error = events[-1]["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert "Traceback" not in r.text and UPSTREAM_KEY not in r.text


@pytest.mark.parametrize("kind", ["partial-sse", "not-sse"])
def test_stream_ending_without_done_is_reported_as_cut(
    azure_client, httpserver: HTTPServer, kind: str
) -> None:
    chunks = azure_stream_chunks()
    parts = [sse_body(c, done=False) for c in chunks[:4]] if kind == "partial-sse" else [b"\x00\xff garbage"]
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_handler(_cut_handler(parts, raise_at_end=False))
    r = post_json(
        azure_client, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER_MESSAGES, "stream": True}
    )
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert events, "the client got nothing but [DONE]"
    assert events[-1].keys() == {"error"}


def test_upstream_error_event_mid_stream_is_passed_on_then_done(azure_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()
    err = {
        "error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}
    }
    expect_stream(httpserver, [*chunks[:3], err, chunks[3]], done=False)
    r = post_json(
        azure_client, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER_MESSAGES, "stream": True}
    )
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert events[-1] == err
    assert len(events) == 3  # folded role chunk, one content chunk, the error; nothing after it


def test_malformed_stream_event_ends_with_error_event(azure_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()
    expect_stream(httpserver, [*chunks[:3], b"{not json", chunks[3]])
    r = post_json(
        azure_client, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER_MESSAGES, "stream": True}
    )
    assert_sse_headers(r)
    events = sse_json(r.content)
    assert events[-1]["error"]["code"] == "upstream_bad_response"
    assert {"message", "type", "param", "code"} <= set(events[-1]["error"])


def test_crlf_and_multiline_upstream_events_are_parsed(azure_client, httpserver: HTTPServer) -> None:
    chunks = azure_stream_chunks()[1:4]
    raw = b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks)
    raw = b": keep-alive comment\n\n" + raw + b"data: [DONE]\r\n\r\n"
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_data(raw, content_type=SSE)
    r = post_json(
        azure_client, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER_MESSAGES, "stream": True}
    )
    assert_sse_headers(r)
    assert sse_json(r.content) == chunks
