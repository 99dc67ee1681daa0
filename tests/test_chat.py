"""Non-streaming chat completions: what goes upstream (path, query, headers, body bytes) and what comes back."""

from __future__ import annotations

import orjson
import pytest
from pytest_httpserver import HTTPServer

from llm_backend.config import ModelConfig
from tests.conftest import (
    API_VERSION,
    AZURE_CHAT_PATH,
    UPSTREAM_KEY,
    USER_MESSAGES,
    azure_chat_completion,
    openai_backend,
)


def compact(data: object) -> bytes:
    return orjson.dumps(data)


def expect_azure_chat(httpserver: HTTPServer, answer: dict | None = None) -> bytes:
    body = orjson.dumps(answer or azure_chat_completion())
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_data(
        body, content_type="application/json"
    )
    return body


def only_upstream_request(httpserver: HTTPServer):
    assert len(httpserver.log) == 1, httpserver.log
    return httpserver.log[0][0]


def test_forwards_to_azure_deployment_with_api_key_and_version(azure_client, httpserver: HTTPServer) -> None:
    expect_azure_chat(httpserver)
    r = azure_client.post(
        "/v1/chat/completions",
        content=compact({"model": "gpt-4o", "messages": USER_MESSAGES}),
        headers={"Content-Type": "application/json", "Authorization": "Bearer client-key-not-for-upstream"},
    )
    assert r.status_code == 200, r.text
    req = only_upstream_request(httpserver)
    assert req.method == "POST"
    assert req.path == AZURE_CHAT_PATH
    assert req.args.to_dict(flat=False) == {"api-version": [API_VERSION]}
    assert req.headers["api-key"] == UPSTREAM_KEY
    assert "client-key-not-for-upstream" not in str(req.headers)
    assert "Authorization" not in req.headers or "client-key" not in req.headers["Authorization"]
    assert req.headers["Content-Type"].startswith("application/json")


def test_unknown_fields_are_forwarded_byte_for_byte(azure_client, httpserver: HTTPServer) -> None:
    expect_azure_chat(httpserver)
    sent = compact(
        {
            "model": "gpt-4o",
            "messages": USER_MESSAGES,
            "temperature": 0.2,
            "some_future_parameter": {"nested": [1, 2, {"x": None}]},
            "data_sources": [{"type": "azure_search", "parameters": {"endpoint": "https://s"}}],
            "unicode": "grüße 🌍",
        }
    )
    r = azure_client.post("/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert only_upstream_request(httpserver).get_data() == sent


def test_response_comes_back_unchanged_with_azure_filter_results(
    azure_client, httpserver: HTTPServer
) -> None:
    answer = expect_azure_chat(httpserver)
    r = azure_client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER_MESSAGES})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.content == answer
    data = r.json()
    assert data["prompt_filter_results"][0]["content_filter_results"]["jailbreak"] == {
        "filtered": False,
        "detected": False,
    }
    assert data["choices"][0]["content_filter_results"]["protected_material_code"]["detected"] is False


def test_alias_reaches_the_same_deployment(azure_client, httpserver: HTTPServer) -> None:
    expect_azure_chat(httpserver)
    sent = compact({"model": "gpt-4", "messages": USER_MESSAGES})
    r = azure_client.post("/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    req = only_upstream_request(httpserver)
    assert req.path == AZURE_CHAT_PATH
    assert req.get_data() == sent


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"n": 2}, id="n"),
        pytest.param({"logprobs": True, "top_logprobs": 3}, id="logprobs"),
        pytest.param({"response_format": {"type": "json_object"}}, id="response_format-json"),
        pytest.param(
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
                }
            },
            id="response_format-schema",
        ),
        pytest.param({"seed": 42}, id="seed"),
        pytest.param({"stop": ["\n", "END"]}, id="stop"),
        pytest.param({"max_tokens": 50}, id="max_tokens"),
        pytest.param({"max_completion_tokens": 50}, id="max_completion_tokens"),
        pytest.param({"user": "user-123"}, id="user"),
        pytest.param(
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "description": "Weather for a city",
                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                        },
                    }
                ],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": False,
            },
            id="tools",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in this image?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                            },
                        ],
                    }
                ]
            },
            id="image-parts",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "developer", "content": "Use tools."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
                ]
            },
            id="tool-conversation",
        ),
        pytest.param(
            {"frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"50256": -100}},
            id="penalties",
        ),
        pytest.param({"reasoning_effort": "low", "store": False, "metadata": {"a": "b"}}, id="newer-fields"),
    ],
)
def test_every_field_is_forwarded(azure_client, httpserver: HTTPServer, extra: dict) -> None:
    expect_azure_chat(httpserver)
    body = {"model": "gpt-4o", "messages": USER_MESSAGES, **extra}
    sent = compact(body)
    r = azure_client.post("/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert only_upstream_request(httpserver).get_data() == sent


def test_pretty_printed_json_is_forwarded_with_the_same_content(azure_client, httpserver: HTTPServer) -> None:
    expect_azure_chat(httpserver)
    body = {"model": "gpt-4o", "messages": USER_MESSAGES, "x_unknown": [1, 2]}
    sent = orjson.dumps(body, option=orjson.OPT_INDENT_2)
    r = azure_client.post("/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert orjson.loads(only_upstream_request(httpserver).get_data()) == body


def test_openai_provider_upstream(make_client, httpserver: HTTPServer) -> None:
    answer = orjson.dumps(azure_chat_completion())
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_data(
        answer, content_type="application/json"
    )
    client = make_client([ModelConfig(name="gpt-4o", backends=(openai_backend(httpserver),))])
    sent = compact({"model": "gpt-4o", "messages": USER_MESSAGES, "unknown_field": True})
    r = client.post(
        "/v1/chat/completions",
        content=sent,
        headers={"Content-Type": "application/json", "Authorization": "Bearer client-key"},
    )
    assert r.status_code == 200, r.text
    assert r.content == answer
    req = only_upstream_request(httpserver)
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer k"
    assert "api-key" not in req.headers
    assert req.get_data() == sent


def test_openai_provider_with_upstream_model_name_rewrites_model(make_client, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_json(
        azure_chat_completion()
    )
    backend = openai_backend(httpserver, model="gpt-4o-2024-08-06")
    client = make_client([ModelConfig(name="gpt-4o", backends=(backend,))])
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER_MESSAGES, "zzz": 1})
    assert r.status_code == 200, r.text
    sent = orjson.loads(only_upstream_request(httpserver).get_data())
    assert sent == {"model": "gpt-4o-2024-08-06", "messages": USER_MESSAGES, "zzz": 1}


def test_azure_style_route_forwards_to_the_same_deployment(azure_client, httpserver: HTTPServer) -> None:
    answer = expect_azure_chat(httpserver)
    sent = compact({"messages": USER_MESSAGES, "temperature": 0, "new_thing": "x"})
    r = azure_client.post(
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        content=sent,
        headers={"Content-Type": "application/json", "api-key": "client-key-not-for-upstream"},
    )
    assert r.status_code == 200, r.text
    assert r.content == answer
    req = only_upstream_request(httpserver)
    assert req.path == AZURE_CHAT_PATH
    assert req.args["api-version"] == API_VERSION
    assert req.headers["api-key"] == UPSTREAM_KEY
    assert req.get_data() == sent


def test_mock_chat_answers_deterministically(client) -> None:
    body = {"model": "mock", "messages": [{"role": "user", "content": "tell me a joke"}], "n": 2}
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    assert a["object"] == "chat.completion"
    assert len(a["choices"]) == 2
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert "tell me a joke" in a["choices"][0]["message"]["content"]
    assert a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]


def test_mock_alias_is_served(client) -> None:
    r = client.post("/v1/chat/completions", json={"model": "gpt-3.5-turbo", "messages": USER_MESSAGES})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_completions_and_embeddings_forwarded_to_azure(azure_client, httpserver: HTTPServer) -> None:
    completion = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-35-turbo-instruct",
        "choices": [{"text": " world", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    embeddings = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    httpserver.expect_request("/openai/deployments/gpt-4o-prod/completions").respond_with_json(completion)
    httpserver.expect_request("/openai/deployments/gpt-4o-prod/embeddings").respond_with_json(embeddings)
    sent_c = compact({"model": "gpt-4o", "prompt": "hello", "suffix": "x", "best_of": 1})
    sent_e = compact({"model": "gpt-4o", "input": ["hello"], "dimensions": 2, "encoding_format": "float"})
    rc = azure_client.post("/v1/completions", content=sent_c, headers={"Content-Type": "application/json"})
    re_ = azure_client.post("/v1/embeddings", content=sent_e, headers={"Content-Type": "application/json"})
    assert rc.status_code == 200 and rc.json() == completion
    assert re_.status_code == 200 and re_.json() == embeddings
    reqs = {r.path: r for r, _ in httpserver.log}
    assert reqs["/openai/deployments/gpt-4o-prod/completions"].get_data() == sent_c
    assert reqs["/openai/deployments/gpt-4o-prod/embeddings"].get_data() == sent_e
    assert all(r.args["api-version"] == API_VERSION for r in reqs.values())


TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}


def test_assistant_tool_call_turn_with_null_content_is_accepted(azure_client, httpserver: HTTPServer) -> None:
    expect_azure_chat(httpserver)
    messages = [
        *USER_MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
    ]
    sent = compact({"model": "gpt-4o", "messages": messages})
    r = azure_client.post("/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert only_upstream_request(httpserver).get_data() == sent


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "mock", "messages": USER_MESSAGES, "stop": None}),
        ("/v1/completions", {"model": "mock", "prompt": "hi", "stop": None}),
    ],
)
def test_stop_null_is_accepted(client, path: str, body: dict) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "field",
    [
        {"temperature": None},
        {"stream": None},
        {"n": None},
        {"seed": None},
        {"stream_options": None},
        {"top_logprobs": None},
    ],
)
def test_nullable_fields_accept_null(client, field: dict) -> None:
    r = client.post("/v1/chat/completions", json={"model": "mock", "messages": USER_MESSAGES, **field})
    assert r.status_code == 200, r.text


def test_assistant_tool_call_turn_without_content_and_array_contents(client) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        *USER_MESSAGES,
        {"role": "assistant", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "22C"}]},
        {
            "role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}],
        },
    ]
    r = client.post("/v1/chat/completions", json={"model": "mock", "messages": messages})
    assert r.status_code == 200, r.text
