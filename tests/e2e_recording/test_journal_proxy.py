"""What the proxy hands the journal: a provisional record per forwarded request, the final one before the
stream's `data: [DONE]`, and estimated completion tokens for a JSON answer without `usage`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_backend.config import BackendConfig, ModelConfig
from llm_backend.recording.records import OUTCOME_INTERRUPTED, RequestRecord
from llm_backend.services.proxy import DONE_FRAME, Caller, ProxyService, StreamResult
from llm_backend.tokens import count_tokens
from llm_backend.upstream.base import CHAT
from llm_backend.upstream.mock import MockBackend
from llm_backend.upstream.router import Router
from tests.e2e_recording.conftest import MODEL, FakeAzure, azure_model, json_response, row_by_id

MESSAGES = [{"role": "user", "content": "Tell me something"}]


def _answer_without_usage(content: str, tool_args: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_args is not None:
        message["tool_calls"] = [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": tool_args}}
        ]
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1739000000,
        "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
    }


def test_json_answer_without_usage_is_estimated_from_the_reply(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    reply = "A reply of some length, which the estimate counts at about four characters a token."
    args = '{"city": "Paris", "days": 3}'
    fake_azure.reply = lambda body: json_response(_answer_without_usage(reply, args))
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES},
            headers={"X-Request-Id": "rid-no-usage"},
        )
        assert r.status_code == 200, r.text
        assert "usage" not in r.json()  # passed through as the upstream sent it
    row = row_by_id(db_url, "rid-no-usage")
    assert row["outcome"] == "ok" and row["tokens_estimated"] is True
    expected = count_tokens(reply) + count_tokens("lookup") + count_tokens(args)
    assert row["completion_tokens"] == expected
    assert row["prompt_tokens"] > 0
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


class JournalSpy:
    """A sink that notes provisional and final records in the order they arrive."""

    def __init__(self) -> None:
        self.events: list[tuple[str, RequestRecord]] = []

    def submit(self, record: RequestRecord) -> None:
        self.events.append(("submit", record))

    def started(self, record: RequestRecord) -> None:
        self.events.append(("started", record))


async def test_stream_record_is_journaled_before_done_and_progress_is_estimated() -> None:
    cfg = ModelConfig(name="mock", backends=(BackendConfig(provider="mock", name="m", delay_ms=0),))
    router = Router([cfg], {"mock/m": MockBackend(cfg.backends[0])})
    spy = JournalSpy()
    proxy = ProxyService(router, spy)
    caller = Caller(request_id="rid-stream", route="/v1/chat/completions")
    body = {"model": "mock", "messages": MESSAGES, "stream": True}
    result = await proxy.forward(CHAT, body, caller)
    assert isinstance(result, StreamResult)
    kinds_at_done: list[str] | None = None
    frames = []
    async for frame in result.frames:
        if frame == DONE_FRAME:
            kinds_at_done = [k for k, _ in spy.events]
        frames.append(frame)
    assert frames[-1] == DONE_FRAME
    # asked upstream: provisional; first token: provisional with what was relayed; then the record, all
    # before the last byte
    assert kinds_at_done is not None and kinds_at_done[0] == "started" and kinds_at_done[-1] == "submit"
    assert kinds_at_done.count("submit") == 1
    first, progress = spy.events[0][1], spy.events[1][1]
    assert first.outcome == OUTCOME_INTERRUPTED and first.error_type == "worker_died"
    assert first.usage.estimated and first.usage.prompt_tokens > 0 and first.usage.completion_tokens == 0
    assert first.backend == "m" and first.stream is True and first.key_id is None
    assert progress.usage.completion_tokens > 0 and progress.status_code == 200
    final = spy.events[-1][1]
    assert final.outcome == "ok" and final.request_id == "rid-stream" and not final.usage.estimated
    assert [k for k, _ in spy.events] == kinds_at_done  # nothing more after the stream ended
    assert not caller.log.get("error")


async def test_json_request_journals_a_provisional_record_first() -> None:
    cfg = ModelConfig(name="mock", backends=(BackendConfig(provider="mock", name="m", delay_ms=0),))
    router = Router([cfg], {"mock/m": MockBackend(cfg.backends[0])})
    spy = JournalSpy()
    proxy = ProxyService(router, spy)
    caller = Caller(request_id="rid-json", route="/v1/chat/completions", key_id="key-1")
    await proxy.forward(CHAT, {"model": "mock", "messages": MESSAGES}, caller)
    assert [k for k, _ in spy.events] == ["started", "submit"]
    started = spy.events[0][1]
    assert started.status_code == 502 and started.outcome == OUTCOME_INTERRUPTED
    assert started.key_id == "key-1" and started.model == "mock" and started.provider == "mock"
    assert caller.recorded  # by the final record, not by the provisional one
