"""Streams fail over only before their first byte; after it, the error ends the stream. Streams hold a slot."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import orjson
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.app import create_app
from llm_backend.config import Timeouts
from tests.conftest import assert_openai_error, azure_stream_chunks, running_server, sse_body, sse_json
from tests.routing.conftest import (
    ADMIN,
    CHAT_PATH,
    MESSAGES,
    SSE,
    answer,
    backends,
    chat,
    cut_stream,
    fail,
    hits,
    model,
    region,
    stall,
    stream_ok,
)

TEXT = "Hello! How can I help?"


def stream_text(raw: bytes) -> str:
    events = sse_json(raw)
    assert all(e.get("choices") for e in events), events
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events)


def test_stream_fails_over_before_the_first_byte(open_client, east: HTTPServer, west: HTTPServer) -> None:
    fail(east, 503, {"error": {"code": "ServiceUnavailable", "message": "The service is temporarily unable"}})
    stream_ok(west)
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    r = chat(c, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert stream_text(r.content) == TEXT
    assert (hits(east), hits(west)) == (1, 1)
    assert orjson.loads(west.log[0][0].get_data())["stream"] is True
    state = backends(c)
    assert state["eastus"]["failures"] == 1
    assert state["westus"]["successes"] == 1 and state["westus"]["in_flight"] == 0


def test_stream_after_a_429_fails_over_and_cools_the_region(
    open_client, east: HTTPServer, west: HTTPServer
) -> None:
    fail(east, 429, headers={"retry-after-ms": "5000"})
    stream_ok(west)
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    assert stream_text(chat(c, stream=True).content) == TEXT
    assert stream_text(chat(c, stream=True).content) == TEXT
    assert (hits(east), hits(west)) == (1, 2)


def test_stream_does_not_fail_over_after_the_first_byte(
    open_client, east: HTTPServer, west: HTTPServer
) -> None:
    cut_stream(east)
    stream_ok(west)
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    r = chat(c, stream=True)
    assert r.status_code == 200
    assert r.content.endswith(b"data: [DONE]\n\n")
    events = sse_json(r.content)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1].keys() == {"error"}
    error = events[-1]["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert "eastus" in error["message"]
    assert all("choices" in e for e in events[:-1])
    assert hits(west) == 0, "a stream that has started is never replayed elsewhere"
    state = backends(c)["eastus"]
    assert state["failures"] == 1 and state["in_flight"] == 0


def test_stream_timeout_before_the_first_byte_fails_over(
    open_client, laggard: HTTPServer, west: HTTPServer
) -> None:
    arrived = stall(laggard, sse_body(*azure_stream_chunks()), SSE)
    stream_ok(west)
    timeouts = Timeouts(connect=1, first_byte=0.5, total=1)
    c = open_client(model(region(laggard, "eastus", timeout=timeouts), region(west, "westus", priority=1)))
    t0 = time.monotonic()
    r = chat(c, stream=True)
    elapsed = time.monotonic() - t0
    # the laggard holds the request for a minute: a stream now means the first-byte timeout ended that attempt
    assert stream_text(r.content) == TEXT
    assert len(arrived) == 1 and hits(west) == 1
    assert elapsed >= timeouts.first_byte, f"gave up after {elapsed:.2f}s, before {timeouts}"


def test_stream_400_is_returned_without_failover(open_client, east: HTTPServer, west: HTTPServer) -> None:
    body = {
        "error": {"message": "bad tools", "type": "invalid_request_error", "param": "tools", "code": None}
    }
    fail(east, 400, body)
    stream_ok(west)
    c = open_client(model(region(east, "eastus"), region(west, "westus", priority=1)))
    assert_openai_error(chat(c, stream=True), 400, param="tools")
    assert hits(west) == 0


def test_a_stream_holds_its_backend_slot_until_it_ends(settings, east: HTTPServer, west: HTTPServer) -> None:
    parts = [sse_body(c, done=False) for c in azure_stream_chunks()] + [b"data: [DONE]\n\n"]
    go_on = threading.Event()

    def slow_stream(request: Request) -> Response:
        def gen() -> Iterator[bytes]:
            yield parts[0] + parts[1]
            go_on.wait(60)  # the rest only once the test has looked at the slots
            yield b"".join(parts[2:])

        return Response(gen(), content_type=SSE)

    east.expect_request(CHAT_PATH, method="POST").respond_with_handler(slow_stream)
    answer(west, "west")
    cfg = model(region(east, "eastus", max_parallel=1), region(west, "westus", priority=1))
    app = create_app(settings(cfg))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as streaming:
            assert streaming.status_code == 200
            chunks = streaming.iter_bytes()  # one iterator: dropping it would close the connection
            first = next(chunks)
            assert first.startswith(b"data: ")
            rows = {r["backend"]: r for r in http.get("/admin/backends", headers=ADMIN).json()["data"]}
            assert rows["eastus"]["in_flight"] == 1, "the stream still holds east's only slot"
            # east is full: the next request goes to west
            r = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "west"
            go_on.set()
            rest = b"".join(chunks)
        assert stream_text(first + rest) == TEXT
        rows = {r["backend"]: r for r in http.get("/admin/backends", headers=ADMIN).json()["data"]}
        assert rows["eastus"]["in_flight"] == 0 and rows["westus"]["in_flight"] == 0
        assert rows["eastus"]["successes"] == 1
