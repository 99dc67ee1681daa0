"""The journal sees Responses requests as it sees chat: provisional records first, the record before the end."""

from __future__ import annotations

from llm_backend.config import BackendConfig, ModelConfig
from llm_backend.recording.records import OUTCOME_INTERRUPTED
from llm_backend.services.affinity import ResponseOwners
from llm_backend.services.proxy import Caller, ProxyService, StreamResult
from llm_backend.services.responses import ResponsesService
from llm_backend.upstream.mock import MockBackend
from llm_backend.upstream.router import Router
from tests.e2e_recording.test_journal_proxy import JournalSpy


def _service(spy: JournalSpy) -> ResponsesService:
    cfg = ModelConfig(name="mock", backends=(BackendConfig(provider="mock", name="m", delay_ms=0),))
    router = Router([cfg], {"mock/m": MockBackend(cfg.backends[0])})
    return ResponsesService(ProxyService(router, spy), ResponseOwners())


async def test_stream_record_is_journaled_before_the_last_event() -> None:
    spy = JournalSpy()
    service = _service(spy)
    caller = Caller(request_id="rid-r-stream", route="/v1/responses")
    result = await service.create({"model": "mock", "input": "Hello there", "stream": True}, caller)
    assert isinstance(result, StreamResult)
    kinds_at_end: list[str] | None = None
    frames = []
    async for frame in result.frames:
        if frame.startswith(b"event: response.completed\n"):
            kinds_at_end = [k for k, _ in spy.events]
        frames.append(frame)
    assert frames[-1].startswith(b"event: response.completed\n")
    assert kinds_at_end is not None and kinds_at_end[0] == "started" and kinds_at_end[-1] == "submit"
    assert kinds_at_end.count("submit") == 1 and "started" in kinds_at_end[1:-1], "progress while streaming"
    first, final = spy.events[0][1], spy.events[-1][1]
    assert first.outcome == OUTCOME_INTERRUPTED and first.operation == "responses" and first.stream is True
    assert final.outcome == "ok" and not final.usage.estimated and final.usage.total_tokens > 0
    assert [k for k, _ in spy.events] == kinds_at_end


async def test_json_response_journals_first_and_settles_once() -> None:
    spy = JournalSpy()
    service = _service(spy)
    caller = Caller(request_id="rid-r-json", route="/v1/responses", key_id="key-1")
    await service.create({"model": "mock", "input": "Hello"}, caller)
    assert [k for k, _ in spy.events] == ["started", "submit"]
    assert spy.events[0][1].status_code == 502 and spy.events[1][1].operation == "responses"
    assert caller.recorded
