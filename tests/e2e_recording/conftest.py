"""End-to-end recording fixtures: migrated SQLite/PostgreSQL databases, apps with recording on, a fake Azure.

Every test that takes `db_url` runs on a tmp SQLite file and, when TEST_DATABASE_URL is set, on a fresh
PostgreSQL database created for the test session (and dropped after it); without TEST_DATABASE_URL the
PostgreSQL variant is skipped with a message saying so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.app import create_app
from llm_backend.config import BackendConfig, ModelConfig, Settings, Timeouts
from llm_backend.db.models import Conversation, Message, RequestLog
from llm_backend.db.session import make_engine, session_scope
from tests.conftest import running_server
from tests.conftest_db import (
    NO_POSTGRES,
    TEST_DATABASE_URL,
    backend,
    create_pg_database,
    db_url,
    drop_pg_database,
    empty_db_url,
    pg_migrated_url,
)

__all__ = [
    "NO_POSTGRES",
    "TEST_DATABASE_URL",
    "backend",
    "create_pg_database",
    "db_url",
    "drop_pg_database",
    "empty_db_url",
    "pg_migrated_url",
]

DEPLOYMENT = "d"
API_VERSION = "2024-10-21"
CHAT_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
MODEL = "gpt-4o"


# -- models and apps -----------------------------------------------------------------------------------------


def azure_model(httpserver: HTTPServer, name: str = MODEL, **backend_kw: Any) -> ModelConfig:
    """A model served by the fake Azure deployment `d` that httpserver plays."""
    kw: dict[str, Any] = {
        "provider": "azure",
        "name": "fake-azure",
        "endpoint": httpserver.url_for("").rstrip("/"),
        "deployment": DEPLOYMENT,
        "api_version": API_VERSION,
        "api_key": "k",
    }
    kw.update(backend_kw)
    return ModelConfig(name=name, backends=(BackendConfig(**kw),), retries=0)


def mock_model(name: str = "mock", delay_ms: float = 0.0) -> ModelConfig:
    return ModelConfig(name=name, backends=(BackendConfig(provider="mock", name="m", delay_ms=delay_ms),))


def short_timeout() -> Timeouts:
    return Timeouts(connect=2.0, first_byte=0.5, total=0.5)


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Settings with recording on, auth off, the given database and models; keywords override."""

    def make(database_url: str, models: Any, **kw: Any) -> Settings:
        kw.setdefault("auth", "none")
        kw.setdefault("recording", True)
        kw.setdefault("data_dir", tmp_path / "data")
        kw.setdefault("log_level", "WARNING")
        return Settings(models=tuple(models), database_url=database_url, **kw)

    return make


@pytest.fixture
def app_for(settings_for: Callable[..., Settings]) -> Callable[..., Any]:
    """A fresh app (create_app) for a database and models; use `with app.test_client() as c:`."""

    def make(database_url: str, models: Any, **kw: Any) -> Any:
        return create_app(settings_for(database_url, models, **kw))

    return make


# -- reading what was recorded -------------------------------------------------------------------------------


def _as_dict(obj: Any) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in sa.inspect(obj).mapper.column_attrs}


def request_rows(url: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            return [
                _as_dict(r) for r in session.scalars(sa.select(RequestLog).order_by(RequestLog.created_at))
            ]
    finally:
        engine.dispose()


def row_by_id(url: str, request_id: str) -> dict[str, Any]:
    """The one row of a request, by our request id or by the id its client sent (X-Request-Id)."""
    rows = [r for r in request_rows(url) if request_id in (r["request_id"], r["client_request_id"])]
    assert len(rows) == 1, f"expected one row for {request_id}, found {len(rows)}"
    return rows[0]


def conversations(url: str) -> list[dict[str, Any]]:
    """Every conversation with its messages (dicts with `messages` in position order)."""
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            out = []
            for conv in session.scalars(sa.select(Conversation).order_by(Conversation.created_at)):
                d = _as_dict(conv)
                d["messages"] = [
                    _as_dict(m)
                    for m in session.scalars(
                        sa.select(Message)
                        .where(Message.conversation_id == conv.id)
                        .order_by(Message.position)
                    )
                ]
                out.append(d)
            return out
    finally:
        engine.dispose()


def count_rows(url: str, model: type[Any]) -> int:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            return int(session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)
    finally:
        engine.dispose()


# -- OpenAI-shaped answers of the fake upstream ---------------------------------------------------------------


def completion(content: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-upstream-own-id",
        "object": "chat.completion",
        "created": 1739000000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content, "refusal": None},
            }
        ],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stream-upstream-id",
        "object": "chat.completion.chunk",
        "created": 1739000000,
        "model": "gpt-4o-2024-08-06",
        "choices": choices,
        **extra,
    }


def stream_events(words: tuple[str, ...], usage: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Azure's stream: the prompt-filter chunk, role, words, finish, and (optionally) the usage chunk."""
    events: list[dict[str, Any]] = [
        {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": []},
        _chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
    ]
    for w in words:
        events.append(_chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None}]))
    events.append(_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if usage is not None:
        events.append(_chunk([], usage=usage))
    return events


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def sse_response(events: list[dict[str, Any]]) -> Response:
    return Response(sse(events), status=200, content_type="text/event-stream")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status=status, headers=headers, content_type="application/json")


class FakeAzure:
    """The fake Azure deployment: answers with `reply(body)` and remembers the JSON bodies it received."""

    def __init__(self, httpserver: HTTPServer) -> None:
        self.httpserver = httpserver
        self.bodies: list[dict[str, Any]] = []
        self.reply: Callable[[dict[str, Any]], Response] = lambda body: json_response(completion("Hi."))
        httpserver.expect_request(CHAT_PATH, method="POST").respond_with_handler(self._handle)

    def _handle(self, request: Request) -> Response:
        body = orjson.loads(request.get_data())
        self.bodies.append(body)
        return self.reply(body)

    def answer(
        self, content: str | Callable[[dict[str, Any]], str], usage: dict[str, Any] | None = None
    ) -> None:
        """Non-streamed requests get `content` (or `content(body)`); streamed ones get it word by word with a
        usage chunk."""

        def reply(body: dict[str, Any]) -> Response:
            text = content(body) if callable(content) else content
            if body.get("stream"):
                words = tuple(w if i == 0 else " " + w for i, w in enumerate(text.split(" ")))
                u = usage or {
                    "prompt_tokens": 10,
                    "completion_tokens": len(words),
                    "total_tokens": 10 + len(words),
                }
                return sse_response(stream_events(words, u))
            return json_response(completion(text, usage))

        self.reply = reply


@pytest.fixture
def fake_azure(httpserver: HTTPServer) -> FakeAzure:
    return FakeAzure(httpserver)


# -- a real port ---------------------------------------------------------------------------------------------


uvicorn_server = running_server  # the shared real-port server; leaving it drains the recorder


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def assert_openai_error(response: Any, status: int, code: Any = ...) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    if code is not ...:
        assert error["code"] == code, error
    return error
