"""Tracing fixtures: the SDK's in-memory exporter under a running app, fake Azure regions, W3C contexts."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pytest_httpserver import HTTPServer

from llm_backend.app import create_app
from llm_backend.config import ModelConfig, Settings
from llm_backend.db import migrate
from llm_backend.tracing import otel
from tests.conftest import running_server

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_PROPAGATORS",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
    "LLM_BACKEND_OTEL_CONTENT_MAX_CHARS",
)


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean OTEL_* environment (whatever the machine has set), for the test to fill in."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class MemoryExporter(InMemorySpanExporter):
    """The SDK's in-memory exporter, kept open when an app shuts down (so one test may run several)."""

    def shutdown(self) -> None:
        return None


@pytest.fixture
def exporter(otel_env: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on (an OTLP endpoint is set), exporting into memory instead of over the network."""
    memory = MemoryExporter()
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # never reached: exporter replaced

    def make_exporter(name: str) -> SpanExporter:
        assert name == "otlp"
        return memory

    otel_env.setattr(otel, "make_exporter", make_exporter)
    return memory


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`with serve(models, **settings) as url:` an app on a real port, recording into a migrated SQLite file.
    Leaving the block runs the lifespan's shutdown, which flushes every span to the exporter."""
    db = f"sqlite:///{tmp_path}/tracing.db"
    migrate.upgrade(db)

    def start(models: list[ModelConfig], **kw: Any) -> Any:
        kw.setdefault("auth", "none")
        kw.setdefault("recording", True)
        kw.setdefault("database_url", db)
        kw.setdefault("data_dir", tmp_path / "data")
        kw.setdefault("log_level", "WARNING")
        return running_server(create_app(Settings(models=tuple(models), **kw)))

    yield start


@pytest.fixture
def second_region() -> Iterator[HTTPServer]:
    """Another fake Azure region, besides pytest-httpserver's own `httpserver`."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


class ClientContext:
    """A W3C trace context as a client would send it."""

    def __init__(self) -> None:
        self.trace_id = secrets.token_hex(16)
        self.span_id = secrets.token_hex(8)
        self.headers = {"traceparent": f"00-{self.trace_id}-{self.span_id}-01", "tracestate": "vendor=client"}


@pytest.fixture
def client_context() -> ClientContext:
    return ClientContext()


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def only_server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = server_spans(exporter)
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    return spans[0]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    """The client spans (upstream attempts) under `parent`, in the order they started."""
    spans = [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(spans, key=lambda s: s.start_time or 0)


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def hex_span(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


def traceparents(server: HTTPServer) -> list[str | None]:
    """The traceparent header of every request the fake upstream received, in order."""
    return [request.headers.get("traceparent") for request, _ in server.log]
