"""The Azure OpenAI-style inbound routes: /openai/deployments/{deployment}/… and the listings."""

from __future__ import annotations

import orjson
from pytest_httpserver import HTTPServer

from llm_backend.config import ModelConfig
from tests.conftest import (
    AZURE_COMPLETIONS_PATH,
    AZURE_EMBEDDINGS_PATH,
    UPSTREAM_KEY,
    USER_MESSAGES,
    assert_openai_error,
    azure_chat_completion,
    mock_model,
    openai_backend,
)

Q = "?api-version=2024-10-21"


def test_list_deployments(client) -> None:
    r = client.get(f"/openai/deployments{Q}")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list"
    assert [d["id"] for d in data["data"]] == ["mock", "gpt-3.5-turbo"]
    first = data["data"][0]
    assert first["model"] == "mock" and first["object"] == "deployment" and first["status"] == "succeeded"


def test_list_models_azure_style(client) -> None:
    r = client.get(f"/openai/models{Q}")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["mock", "gpt-3.5-turbo"]


def test_v1_models_lists_names_and_aliases(make_client) -> None:
    client = make_client([mock_model("a", aliases=("a1", "a2")), mock_model("b")])
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["a", "a1", "a2", "b"]
    assert all(
        m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] for m in data["data"]
    )
    assert client.get("/v1/models/a2").json()["id"] == "a2"


def test_azure_route_chat_with_api_key_header(client) -> None:
    r = client.post(
        f"/openai/deployments/mock/chat/completions{Q}",
        json={"messages": USER_MESSAGES, "n": 2},
        headers={"api-key": "anything"},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_azure_route_completions_and_embeddings_upstream(azure_client, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_COMPLETIONS_PATH).respond_with_json(
        {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": []}
    )
    httpserver.expect_request(AZURE_EMBEDDINGS_PATH).respond_with_json(
        {"object": "list", "data": [], "model": "m"}
    )
    sent_c = orjson.dumps({"prompt": "hi", "max_tokens": 3, "x": 1})
    sent_e = orjson.dumps({"input": "hi", "encoding_format": "base64"})
    headers = {"Content-Type": "application/json", "api-key": "client-key"}
    rc = azure_client.post(f"/openai/deployments/gpt-4o/completions{Q}", content=sent_c, headers=headers)
    re_ = azure_client.post(f"/openai/deployments/gpt-4/embeddings{Q}", content=sent_e, headers=headers)
    assert rc.status_code == 200 and re_.status_code == 200
    got = {req.path: req for req, _ in httpserver.log}
    assert got[AZURE_COMPLETIONS_PATH].get_data() == sent_c
    assert got[AZURE_EMBEDDINGS_PATH].get_data() == sent_e
    for req in got.values():
        assert req.headers["api-key"] == UPSTREAM_KEY
        assert req.args["api-version"] == "2024-10-21"


def test_azure_route_to_openai_upstream_names_the_model(make_client, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/v1/chat/completions").respond_with_json(azure_chat_completion())
    client = make_client(
        [ModelConfig(name="gpt-4o", aliases=("gpt-4",), backends=(openai_backend(httpserver),))]
    )
    r = client.post(
        f"/openai/deployments/gpt-4/chat/completions{Q}", json={"messages": USER_MESSAGES, "seed": 3}
    )
    assert r.status_code == 200, r.text
    req = httpserver.log[0][0]
    assert req.path == "/v1/chat/completions" and req.headers["Authorization"] == "Bearer k"
    assert orjson.loads(req.get_data()) == {"messages": USER_MESSAGES, "seed": 3, "model": "gpt-4"}


def test_azure_route_errors_are_openai_shaped(client) -> None:
    r = client.post(f"/openai/deployments/nope/chat/completions{Q}", json={"messages": USER_MESSAGES})
    assert_openai_error(r, 404, code="model_not_found")
    r = client.post(f"/openai/deployments/mock/chat/completions{Q}", json={"messages": [{"role": "x"}]})
    assert_openai_error(r, 400, param="messages.[0].role")
    r = client.get(f"/openai/deployments/mock/unknown{Q}")
    assert_openai_error(r, 404, code="unknown_url")
