"""Responses API fixtures: real-shaped response objects and typed event streams, fake upstreams, apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.app import create_app
from llm_backend.config import BackendConfig, ModelConfig, Settings
from llm_backend.db import migrate
from tests.conftest import running_server

MODEL = "gpt-4o"
DEPLOYMENT = "gpt-4o-prod"
PREVIEW = "2025-04-01-preview"
KEY = "upstream-secret-key"
USAGE = {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 12},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 41},
    "total_tokens": 123,
}


def response_object(
    text: str = "Hello from upstream.",
    *,
    rid: str = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    usage: dict[str, Any] | None = USAGE,
    status: str = "completed",
    output: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A response object shaped as OpenAI and Azure send it."""
    message = {
        "type": "message",
        "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return {
        "id": rid,
        "object": "response",
        "created_at": 1741476542,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "gpt-4o-2024-08-06",
        "output": output if output is not None else [message],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
        **extra,
    }


def event_blocks(
    words: tuple[str, ...] = ("Hello", " from", " upstream."),
    *,
    rid: str = "resp_stream_1",
    usage: dict[str, Any] | None = USAGE,
    final: str = "response.completed",
) -> list[bytes]:
    """A Responses stream as the upstream sends it: one `event:` + `data:` block per event."""
    text = "".join(words)
    full = response_object(text, rid=rid, usage=usage)
    start = {**full, "status": "in_progress", "output": [], "usage": None}
    item = full["output"][0]
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {
            "type": "response.content_part.added",
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
    ]
    for w in words:
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "delta": w,
                "logprobs": [],
            }
        )
    events += [
        {
            "type": "response.output_text.done",
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "text": text,
            "logprobs": [],
        },
        {"type": "response.output_item.done", "output_index": 0, "item": item},
    ]
    if final == "response.completed":
        events.append({"type": final, "response": full})
    elif final == "response.failed":
        error = {"code": "server_error", "message": "The model failed to generate a response."}
        events.append({"type": final, "response": {**full, "status": "failed", "error": error}})
    blocks = []
    for seq, e in enumerate(events):
        e["sequence_number"] = seq
        blocks.append(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e))
    return blocks


def event_stream(blocks: list[bytes]) -> bytes:
    return b"".join(b + b"\n\n" for b in blocks)


def json_reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status=status, headers=headers, content_type="application/json")


def sse_reply(raw: bytes) -> Response:
    return Response(raw, status=200, content_type="text/event-stream")


class Upstream:
    """A fake upstream (pytest-httpserver) that records every request: method, path, query, headers, body."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.requests: list[Request] = []
        self.bodies: list[bytes] = []

    def on(self, path: Any, handler: Callable[[Request], Response], method: str = "POST") -> None:
        def record(request: Request) -> Response:
            self.requests.append(request)
            self.bodies.append(request.get_data())
            return handler(request)

        self.server.expect_request(path, method=method).respond_with_handler(record)

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")


def azure(server: HTTPServer | str, name: str = "eastus", **kw: Any) -> BackendConfig:
    endpoint = server if isinstance(server, str) else server.url_for("").rstrip("/")
    cfg: dict[str, Any] = {
        "provider": "azure",
        "name": name,
        "endpoint": endpoint,
        "deployment": DEPLOYMENT,
        "api_version": "v1",
        "api_key": KEY,
    }
    cfg.update(kw)
    return BackendConfig(**cfg)


@pytest.fixture
def migrated(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/responses.db"
    migrate.upgrade(url)
    return url


@pytest.fixture
def make_app(tmp_path: Path, migrated: str) -> Callable[..., Any]:
    """An app for the given models: auth off, recording on (content too) into a migrated SQLite file."""

    def make(*models: ModelConfig, **kw: Any) -> Any:
        kw.setdefault("auth", "none")
        kw.setdefault("recording", True)
        kw.setdefault("database_url", migrated)
        kw.setdefault("data_dir", tmp_path / "data")
        kw.setdefault("log_level", "WARNING")
        return create_app(Settings(models=models, **kw))

    return make


@pytest.fixture
def serve_app(make_app: Callable[..., Any]) -> Iterator[Callable[..., str]]:
    """Serve an app on a real port; returns its base URL (leaving drains the recorder)."""
    import contextlib

    with contextlib.ExitStack() as stack:

        def start(*models: ModelConfig, **kw: Any) -> str:
            return stack.enter_context(running_server(make_app(*models, **kw)))

        yield start


@pytest.fixture
def upstream(httpserver: HTTPServer) -> Upstream:
    return Upstream(httpserver)
