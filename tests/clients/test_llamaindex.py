"""LlamaIndex against llm-backend, unchanged: its OpenAI and Azure OpenAI LLM classes (chat, stream, async,
complete) and its OpenAI embedding class, through a real server with key checking on, offline.

LlamaIndex requires openai<3 and the server pins openai 3.x, so the client runs in its own virtualenv,
.venv-clients (`make install` creates it from requirements-clients.txt), as a client application would."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.app import create_app
from llm_backend.config import ModelConfig
from llm_backend.db import migrate
from tests.conftest import (
    AZURE_CHAT_PATH,
    REPO,
    UPSTREAM_KEY,
    azure_backend,
    azure_chat_completion,
    azure_stream_chunks,
    mock_model,
    running_server,
    sse_body,
)

CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"
SCRIPT = Path(__file__).with_name("llamaindex_client.py")
ADMIN_KEY = "adm-llamaindex"
AZURE_TEXT = "Hello! How can I help?"
MOCK_PREFIX = "This is the llm-backend mock model answering"
#: chat, Azure deployment, embedding and completion model, as the client script takes them
MODELS = ("gpt-4o", "azure-gpt-4o", "text-embedding-3-small", "gpt-3.5-turbo-instruct")

pytestmark = pytest.mark.skipif(
    not CLIENTS_PYTHON.exists(),
    reason=".venv-clients is missing: `make install` creates it from requirements-clients.txt",
)


def azure_upstream(server: HTTPServer) -> None:
    """The fake Azure deployment: a completion, or Azure's stream when asked for one."""

    def handler(request: Request) -> Response:
        if orjson.loads(request.data).get("stream"):
            return Response(sse_body(*azure_stream_chunks()), content_type="text/event-stream")
        return Response(orjson.dumps(azure_chat_completion(AZURE_TEXT)), content_type="application/json")

    server.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_handler(handler)


@pytest.fixture
def gateway(make_settings: Any, tmp_path: Path, httpserver: HTTPServer) -> Iterator[tuple[str, str]]:
    """A real-port llm-backend with keys on: gpt-4o and text-embedding-3-small are mocks, azure-gpt-4o is an
    Azure deployment (pytest-httpserver). Yields its URL and a key."""
    azure_upstream(httpserver)
    db = f"sqlite:///{tmp_path}/keys.db"
    migrate.upgrade(db)
    models = (
        mock_model("gpt-4o"),
        ModelConfig(name="azure-gpt-4o", backends=(azure_backend(httpserver),)),
        mock_model("text-embedding-3-small"),
        mock_model("gpt-3.5-turbo-instruct"),
    )
    settings = make_settings(models, auth="keys", admin_key=ADMIN_KEY, database_url=db)
    with running_server(create_app(settings)) as url:
        r = httpx.post(
            f"{url}/admin/keys", json={"name": "llamaindex"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert r.status_code == 201, r.text
        yield url, r.json()["key"]


def client_run(url: str, key: str) -> subprocess.CompletedProcess[str]:
    """The client script in .venv-clients, offline: anything but llm-backend goes to a closed port, so a
    download at import or first use fails."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LLM_BACKEND_KEY": key,
        "WRONG_KEY": "sk-llmb-" + "x" * 43,
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    return subprocess.run(
        [str(CLIENTS_PYTHON), str(SCRIPT), url, *MODELS], env=env, capture_output=True, text=True, timeout=300
    )


def run_client(url: str, key: str) -> dict[str, Any]:
    done = client_run(url, key)
    assert done.returncode == 0, done.stderr[-5000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_llamaindex_openai_azure_and_embeddings_work_unchanged(
    gateway: tuple[str, str], httpserver: HTTPServer
):
    url, key = gateway
    out = run_client(url, key)

    assert out["context_window"] > 0
    for name in ("chat", "achat", "complete", "acomplete", "legacy_complete"):
        assert out[name].startswith(MOCK_PREFIX), (name, out[name])
    # streams arrive in pieces that add up to the whole answer
    for name in ("stream_chat", "astream_chat", "stream_complete"):
        parts = out[name]
        assert len([p for p in parts if p]) > 3, (name, parts)
        assert "".join(parts) == out["chat"], name

    # the Azure class on the Azure-style route, Azure's own stream (its choice-less first chunk included)
    assert out["azure_chat"] == AZURE_TEXT
    assert out["azure_achat"] == AZURE_TEXT
    assert "".join(out["azure_stream_chat"]) == "Hello! How can I help?"
    assert len(httpserver.log) == 3
    for request, _ in httpserver.log:
        assert request.headers.get("api-key") == UPSTREAM_KEY, "Azure gets its own key, never the caller's"

    dims = len(out["embedding"])
    assert dims > 0 and all(isinstance(x, float) for x in out["embedding"])
    assert [len(v) for v in out["embeddings"]] == [dims] * 3
    assert out["embeddings"][0] != out["embeddings"][1]
    assert out["aembedding"] == out["embedding"], "the mock's embedding is deterministic"
    assert out["tokens"] > 0 and out["gpt_4o_tokens"] > 0
    assert out["wrong_key"] == [401, "invalid_api_key"]
