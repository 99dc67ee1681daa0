"""Responses streams through a real port: a vanished client cancels the upstream; metrics keep ids out."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from werkzeug import Request, Response

from llm_backend.config import ModelConfig
from tests.e2e_recording.conftest import request_rows, wait_for
from tests.responses.conftest import MODEL, Upstream, azure, event_blocks, json_reply, response_object


def test_client_disconnect_cancels_the_upstream_stream(
    upstream: Upstream, serve_app: Callable[..., str], migrated: str
) -> None:
    closed = threading.Event()
    blocks = event_blocks(tuple(f" w{i}" for i in range(200)))

    def slow(request: Request) -> Response:
        def body() -> Any:
            try:
                for b in blocks:
                    yield b + b"\n\n"
                    time.sleep(0.05)
            finally:
                closed.set()

        return Response(body(), status=200, content_type="text/event-stream")

    upstream.on("/openai/v1/responses", slow)
    url = serve_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),)))
    with httpx.Client(base_url=url, timeout=10) as http:
        payload = {"model": MODEL, "input": "long", "stream": True}
        with http.stream("POST", "/v1/responses", json=payload, headers={"X-Request-Id": "gone-r"}) as r:
            assert r.status_code == 200
            assert next(r.iter_raw()).startswith(b"event: response.created\n")
    assert closed.wait(10), "the upstream stream was not closed after the client went away"
    wait_for(lambda: any(row["client_request_id"] == "gone-r" for row in request_rows(migrated)), what="row")
    (row,) = [row for row in request_rows(migrated) if row["client_request_id"] == "gone-r"]
    assert row["outcome"] == "client_disconnected"


def test_metrics_label_stored_response_routes_by_template(
    upstream: Upstream, make_app: Callable[..., Any]
) -> None:
    upstream.on("/openai/v1/responses", lambda r: json_reply(response_object(rid="resp_metric_1")))
    upstream.on(
        "/openai/v1/responses/resp_metric_1",
        lambda r: json_reply(response_object(rid="resp_metric_1")),
        method="GET",
    )
    with make_app(ModelConfig(name=MODEL, backends=(azure(upstream.server),))).test_client() as c:
        assert c.post("/openai/v1/responses", json={"model": MODEL, "input": "hi"}).status_code == 200
        assert c.get("/v1/responses/resp_metric_1").status_code == 200
        assert c.get("/openai/v1/responses/resp_metric_1").status_code == 200
        metrics = c.get("/metrics").text
    assert 'route="/v1/responses/{response_id}"' in metrics
    assert 'route="/openai/v1/responses/{response_id}"' in metrics
    assert 'route="/openai/v1/responses"' in metrics
    assert "resp_metric_1" not in metrics
