"""End to end: gunicorn exporting over OTLP/HTTP (protobuf) to a real receiver on loopback."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import (
    AZURE_CHAT_PATH,
    DEPLOYMENT,
    azure_chat_completion,
    gunicorn_server,
    gunicorn_worker_pids,
)
from tests.tracing.conftest import ClientContext

pytestmark = pytest.mark.slow

MODELS_YAML = """
models:
  - name: gpt-4o
    backends:
      - provider: azure
        name: eastus
        endpoint: {endpoint}
        deployment: {deployment}
        api_version: "2024-10-21"
        api_key: upstream-secret-key
"""


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each `POST /v1/traces` (protobuf) and keeps its spans."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.lock = threading.Lock()
        self.spans: list[tuple[dict[str, Any], SpanProto]] = []  # (resource attributes, span)
        self.content_types: set[str] = set()
        server.expect_request("/v1/traces", method="POST").respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        export = ExportTraceServiceRequest.FromString(request.get_data())
        with self.lock:
            self.content_types.add(request.headers.get("Content-Type", ""))
            for resource_spans in export.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((resource, span))
        return Response(
            ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def server_spans(self) -> list[tuple[dict[str, Any], SpanProto]]:
        with self.lock:
            return [(r, s) for r, s in self.spans if s.kind == SpanProto.SPAN_KIND_SERVER]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"the receiver never saw {what}; it has {len(self.spans)} spans")
            time.sleep(0.05)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


def attributes(span: SpanProto) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield Receiver(server)
    server.clear()
    server.stop()


def gateway_env(tmp_path: Path, upstream: HTTPServer, receiver: Receiver, **extra: str) -> dict[str, str]:
    config = tmp_path / "models.yaml"
    endpoint = upstream.url_for("").rstrip("/")
    config.write_text(MODELS_YAML.format(endpoint=endpoint, deployment=DEPLOYMENT), encoding="utf-8")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        "DATABASE_URL": f"sqlite:///{tmp_path}/e2e.db",
        "LLM_BACKEND_AUTH": "none",
        "LLM_BACKEND_CONFIG": str(config),
        "LLM_BACKEND_RECORDING": "false",
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "WARNING",
        # the standard variable; the exporter adds /v1/traces
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.server.url_for("").rstrip("/"),
        "OTEL_SERVICE_NAME": "llm-backend-e2e",
        **extra,
    }


def chat(url: str, context: ClientContext) -> None:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers=context.headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_spans_reach_an_otlp_receiver_from_the_workers(
    tmp_path: Path, httpserver: HTTPServer, receiver: Receiver
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(azure_chat_completion())
    env = gateway_env(
        tmp_path,
        httpserver,
        receiver,
        WEB_CONCURRENCY="2",
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_EXPERIMENTAL_RESOURCE_DETECTORS="process",  # the SDK's own: process.pid on the resource
    )
    contexts = [ClientContext() for _ in range(6)]
    with gunicorn_server(env, tmp_path / "gunicorn.log", ready_path="/healthz") as (proc, url):
        for context in contexts:
            chat(url, context)
        workers = {int(pid) for pid in gunicorn_worker_pids(proc)}
        # exported by the batch processor while the server runs (it flushes every 200 ms)
        receiver.wait_for(lambda: len(receiver.server_spans()) >= len(contexts), "a span per request")
    by_trace = {s.trace_id.hex(): (r, s) for r, s in receiver.server_spans()}
    assert set(by_trace) == {c.trace_id for c in contexts}, "each request's span is in its client's trace"
    # set up in each worker after the fork, never in the master
    assert {r["process.pid"] for r, _ in by_trace.values()} <= workers
    for context in contexts:
        resource, span = by_trace[context.trace_id]
        assert resource["service.name"] == "llm-backend-e2e"
        assert span.name == "chat gpt-4o"
        assert span.parent_span_id.hex() == context.span_id
        a = attributes(span)
        assert a["gen_ai.provider.name"] == "azure.ai.openai"
        assert a["gen_ai.usage.input_tokens"] == 10
        assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert receiver.content_types == {"application/x-protobuf"}
    # every request's attempt span arrived too, and its context is what the upstream received
    attempts = {s.span_id.hex() for _, s in receiver.spans if s.kind == SpanProto.SPAN_KIND_CLIENT}
    sent = [request.headers.get("traceparent") for request, _ in httpserver.log]
    assert len(sent) == len(contexts)
    for header in sent:
        _, trace_id, span_id, _ = header.split("-")
        assert trace_id in by_trace and span_id in attempts


def test_spans_still_queued_are_flushed_when_the_worker_stops(
    tmp_path: Path, httpserver: HTTPServer, receiver: Receiver
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(azure_chat_completion())
    # the batch processor would wait ten minutes: only the shutdown's flush can export these in time
    env = gateway_env(tmp_path, httpserver, receiver, WEB_CONCURRENCY="1", OTEL_BSP_SCHEDULE_DELAY="600000")
    contexts = [ClientContext() for _ in range(3)]
    with gunicorn_server(env, tmp_path / "gunicorn.log", ready_path="/healthz") as (proc, url):
        for context in contexts:
            chat(url, context)
        proc.terminate()  # SIGTERM: graceful shutdown, the lifespan's shutdown flushes the queue
        proc.wait(timeout=120)
    receiver.wait_for(lambda: len(receiver.server_spans()) >= len(contexts), "the queued spans", timeout=30)
    assert {s.trace_id.hex() for _, s in receiver.server_spans()} == {c.trace_id for c in contexts}
