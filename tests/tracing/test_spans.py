"""Spans through the running app: openai SDK → llm-backend → pytest-httpserver as Azure, in-memory exporter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import ModelConfig
from tests.conftest import (
    AZURE_CHAT_PATH,
    AZURE_COMPLETIONS_PATH,
    AZURE_EMBEDDINGS_PATH,
    azure_backend,
    azure_chat_completion,
    azure_stream_chunks,
    sse_body,
)
from tests.responses.conftest import event_blocks, event_stream, response_object
from tests.tracing.conftest import (
    ClientContext,
    children,
    hex_span,
    hex_trace,
    only_server_span,
    traceparents,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello, secret-prompt-words"},
]


def sdk(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30, **kw)


def gpt4o(*backends: Any, **kw: Any) -> ModelConfig:
    return ModelConfig(name="gpt-4o", aliases=("gpt-4",), backends=tuple(backends), **kw)


def test_chat_json_span_carries_the_genai_attributes_and_joins_the_clients_trace(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer, client_context: ClientContext
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(azure_chat_completion())
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        reply = sdk(url).chat.completions.create(
            model="gpt-4",
            messages=MESSAGES,
            max_tokens=50,
            temperature=0.2,
            top_p=0.9,
            stop=["END"],
            seed=7,
            extra_headers=client_context.headers,
        )
    assert reply.choices[0].message.content

    span = only_server_span(exporter)
    a = span.attributes
    assert span.name == "chat gpt-4"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["openai.api.type"] == "chat_completions"
    assert a["gen_ai.provider.name"] == "azure.ai.openai"
    assert a["gen_ai.request.model"] == "gpt-4"
    assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert a["gen_ai.response.id"] == "chatcmpl-B0azureAbCdEfGhIjKlMnOpQrStUv"
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.usage.input_tokens"] == 10
    assert a["gen_ai.usage.output_tokens"] == 9
    assert a["gen_ai.usage.cache_read.input_tokens"] == 0
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.request.stop_sequences"] == ("END",)
    assert a["gen_ai.request.seed"] == 7
    assert a["gen_ai.request.stream"] is False
    assert a["openai.response.system_fingerprint"] == "fp_f3927aa00d"
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == httpserver.port
    assert a["http.response.status_code"] == 200
    assert a["llm_backend.request_id"].startswith("req_")
    assert a["llm_backend.outcome"] == "ok"
    assert a["llm_backend.model"] == "gpt-4o"
    assert a["llm_backend.backend"] == "eastus"
    assert a["llm_backend.deployment"] == "gpt-4o-prod"
    assert a["llm_backend.tokens_estimated"] is False
    assert "error.type" not in a
    assert span.status.status_code == StatusCode.UNSET
    # the request's span is the client's span's child, in the client's trace
    assert hex_trace(span) == client_context.trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == client_context.span_id
    assert span.parent.is_remote
    assert span.context.trace_state.get("vendor") == "client"
    # one attempt, a CLIENT span under it; the upstream got that attempt's context, in the client's trace
    (attempt,) = children(exporter, span)
    assert attempt.kind == SpanKind.CLIENT
    assert attempt.name == "chat gpt-4o-prod"
    assert attempt.attributes["llm_backend.backend"] == "eastus"
    assert attempt.attributes["llm_backend.deployment"] == "gpt-4o-prod"
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["llm_backend.attempt"] == 1
    (sent,) = traceparents(httpserver)
    assert sent == f"00-{client_context.trace_id}-{hex_span(attempt)}-01"
    (request, _) = httpserver.log[0]
    assert request.headers.get("tracestate") == "vendor=client"
    # the request id in the span is the one the client got back
    assert reply.id == "chatcmpl-B0azureAbCdEfGhIjKlMnOpQrStUv"
    # content stays out of spans unless asked for
    for s in exporter.get_finished_spans():
        assert not any(k in s.attributes for k in ("gen_ai.input.messages", "gen_ai.output.messages"))
        assert "secret-prompt-words" not in repr(dict(s.attributes))
        assert "upstream-secret-key" not in repr(dict(s.attributes))


def test_without_a_client_context_the_request_starts_a_trace_the_upstream_joins(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(azure_chat_completion())
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        sdk(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        # a malformed traceparent is ignored, never an error
        sdk(url).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"traceparent": "00-zz-not-a-context"}
        )
    spans = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(spans) == 2
    for span, sent in zip(spans, traceparents(httpserver), strict=True):
        assert span.parent is None
        assert sent is not None and sent.split("-")[1] == hex_trace(span)


def test_chat_stream_span_ends_with_the_stream_and_has_ttft(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer, client_context: ClientContext
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_data(
        sse_body(*azure_stream_chunks()), content_type="text/event-stream"
    )
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        stream = sdk(url).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=client_context.headers
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello! How can I help?"

    span = only_server_span(exporter)
    a = span.attributes
    assert span.name == "chat gpt-4o"
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.response.id"] == "chatcmpl-B0streamAbCdEfGhIjKlMnOpQr"
    assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert a["gen_ai.usage.input_tokens"] == 10 and a["gen_ai.usage.output_tokens"] == 9
    assert a["llm_backend.outcome"] == "ok"
    ttft = a["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttft
    (event,) = [e for e in span.events if e.name == "llm_backend.first_token"]
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time < event.timestamp <= span.end_time
    # the attempt span covers the upstream exchange: open until the stream ended
    (attempt,) = children(exporter, span)
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.end_time is not None and attempt.end_time <= span.end_time
    assert attempt.end_time > event.timestamp
    assert traceparents(httpserver) == [f"00-{client_context.trace_id}-{hex_span(attempt)}-01"]


def test_a_stream_the_client_cuts_ends_its_span_as_client_disconnected(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer
) -> None:
    release = threading.Event()

    def slow_stream(request: Request) -> Response:
        def gen() -> Iterator[bytes]:
            chunks = azure_stream_chunks(tuple(f" w{i}" for i in range(50)))
            yield sse_body(*chunks[:4], done=False)
            release.wait(30)  # the rest comes only once the client has gone
            yield sse_body(*chunks[4:])

        return Response(gen(), content_type="text/event-stream")

    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_handler(slow_stream)
    try:
        with serve([gpt4o(azure_backend(httpserver))]) as url:
            body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
            with httpx.Client(timeout=30) as client:
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: ") and "w0" in line:
                            break  # got a token: hang up
            deadline = time.monotonic() + 60
            while not exporter.get_finished_spans() and time.monotonic() < deadline:
                time.sleep(
                    0.05
                )  # the span ends when the relay notices; flushed by the shutdown at the latest
    finally:
        release.set()
    span = only_server_span(exporter)
    assert span.attributes["llm_backend.outcome"] == "client_disconnected"
    assert "error.type" not in span.attributes
    assert any(e.name == "llm_backend.client_disconnected" for e in span.events)
    assert "gen_ai.response.time_to_first_chunk" in span.attributes
    (attempt,) = children(exporter, span)
    assert attempt.attributes["llm_backend.outcome"] == "client_disconnected"


def test_a_stream_the_upstream_cuts_ends_its_span_as_an_error(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer
) -> None:
    chunks = azure_stream_chunks()
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_data(
        sse_body(*chunks[:4], done=False), content_type="text/event-stream"
    )
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and "upstream_bad_response" in r.text
    span = only_server_span(exporter)
    assert span.attributes["llm_backend.outcome"] == "error"
    assert span.attributes["error.type"] == "upstream_bad_response"
    assert span.status.status_code == StatusCode.ERROR  # answered 200, then failed: the server's error
    (attempt,) = children(exporter, span)
    assert attempt.attributes["error.type"] == "upstream_bad_response"
    assert attempt.status.status_code == StatusCode.ERROR


def test_completions_span_through_the_azure_style_route(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer
) -> None:
    httpserver.expect_request(AZURE_COMPLETIONS_PATH, method="POST").respond_with_json(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1739000000,
            "model": "gpt-35-turbo-instruct",
            "choices": [{"text": " there", "index": 0, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
    )
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        client = openai.AzureOpenAI(
            azure_endpoint=url, api_key="x", api_version="2024-10-21", max_retries=0, timeout=30
        )
        client.completions.create(model="gpt-4o", prompt="Hello", max_tokens=1)
    span = only_server_span(exporter)
    a = span.attributes
    assert span.name == "text_completion gpt-4o"
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["url.path"] == "/openai/deployments/gpt-4o/completions"
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.response.id"] == "cmpl-1"
    assert a["gen_ai.usage.output_tokens"] == 1
    assert a["gen_ai.request.max_tokens"] == 1


def test_embeddings_span(exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_EMBEDDINGS_PATH, method="POST").respond_with_json(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }
    )
    model = ModelConfig(name="embed", backends=(azure_backend(httpserver),))
    with serve([model]) as url:
        sdk(url).embeddings.create(model="embed", input="hello there", dimensions=3, encoding_format="float")
    span = only_server_span(exporter)
    a = span.attributes
    assert span.name == "embeddings embed"
    assert a["gen_ai.operation.name"] == "embeddings"
    assert "openai.api.type" not in a
    assert a["gen_ai.usage.input_tokens"] == 4
    assert a["gen_ai.usage.output_tokens"] == 0
    assert a["gen_ai.response.model"] == "text-embedding-3-small"
    assert a["gen_ai.embeddings.dimension.count"] == 3
    assert a["gen_ai.request.encoding_formats"] == ("float",)
    (attempt,) = children(exporter, span)
    assert attempt.name == "embeddings gpt-4o-prod"


def test_responses_json_and_stream_spans(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer
) -> None:
    httpserver.expect_ordered_request("/openai/v1/responses", method="POST").respond_with_json(
        response_object("Hi there.")
    )
    httpserver.expect_ordered_request("/openai/v1/responses", method="POST").respond_with_data(
        event_stream(event_blocks()), content_type="text/event-stream"
    )
    with serve([gpt4o(azure_backend(httpserver, api_version="v1"))]) as url:
        client = sdk(url)
        answer = client.responses.create(
            model="gpt-4o", input="Say hi", instructions="Be brief.", max_output_tokens=64
        )
        assert answer.output_text == "Hi there."
        with client.responses.stream(model="gpt-4o", input="Say hello") as stream:
            final = stream.get_final_response()
        assert final.output_text == "Hello from upstream."

    spans = sorted(
        (s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER),
        key=lambda s: s.start_time or 0,
    )
    assert [s.name for s in spans] == ["chat gpt-4o", "chat gpt-4o"]
    json_span, stream_span = (s.attributes for s in spans)
    for a in (json_span, stream_span):
        assert a["gen_ai.operation.name"] == "chat"
        assert a["openai.api.type"] == "responses"
        assert a["llm_backend.operation"] == "responses"
        assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
        assert a["gen_ai.usage.input_tokens"] == 36
        assert a["gen_ai.usage.output_tokens"] == 87
        assert a["gen_ai.usage.cache_read.input_tokens"] == 12
        assert a["gen_ai.usage.reasoning.output_tokens"] == 41
        assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert json_span["gen_ai.response.id"] == "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
    assert json_span["gen_ai.request.max_tokens"] == 64
    assert json_span["gen_ai.request.stream"] is False
    assert stream_span["gen_ai.response.id"] == "resp_stream_1"
    assert stream_span["gen_ai.request.stream"] is True
    assert stream_span["gen_ai.response.time_to_first_chunk"] > 0


def test_429_failover_makes_two_attempt_spans(
    exporter: InMemorySpanExporter,
    serve: Any,
    httpserver: HTTPServer,
    second_region: HTTPServer,
    client_context: ClientContext,
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(
        {"error": {"code": "429", "message": "Requests have exceeded the rate limit."}},
        status=429,
        headers={"Retry-After": "30"},
    )
    second_region.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(azure_chat_completion())
    east = azure_backend(httpserver, name="eastus", priority=0)
    west = azure_backend(second_region, name="westus", priority=1)
    with serve([gpt4o(east, west)]) as url:
        sdk(url).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers=client_context.headers
        )

    span = only_server_span(exporter)
    assert span.attributes["llm_backend.outcome"] == "ok"
    assert span.attributes["llm_backend.attempts"] == 2
    assert span.attributes["llm_backend.backend"] == "westus"
    assert span.attributes["server.port"] == second_region.port
    first, second = children(exporter, span)
    assert first.attributes["llm_backend.backend"] == "eastus"
    assert first.attributes["server.port"] == httpserver.port
    assert first.attributes["http.response.status_code"] == 429
    assert first.attributes["error.type"] == "rate_limit_exceeded"
    assert first.attributes["llm_backend.failover_kind"] == "429"
    assert first.status.status_code == StatusCode.ERROR
    assert second.attributes["llm_backend.backend"] == "westus"
    assert second.attributes["llm_backend.attempt"] == 2
    assert second.attributes["llm_backend.retry_reason"] == "429"
    assert second.attributes["http.response.status_code"] == 200
    assert second.status.status_code == StatusCode.UNSET
    # each region got its own attempt's context, in the client's trace
    assert traceparents(httpserver) == [f"00-{client_context.trace_id}-{hex_span(first)}-01"]
    assert traceparents(second_region) == [f"00-{client_context.trace_id}-{hex_span(second)}-01"]


def test_upstream_error_marks_the_request_and_attempt_spans(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer
) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(
        {"error": {"code": "InternalServerError", "message": "The server had an error."}}, status=500
    )
    with serve([gpt4o(azure_backend(httpserver), retries=0)]) as url:
        with pytest.raises(openai.APIStatusError) as raised:
            sdk(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.status_code == 502
    span = only_server_span(exporter)
    a = span.attributes
    assert a["llm_backend.outcome"] == "error"
    assert a["error.type"] == "upstream_error"
    assert a["http.response.status_code"] == 502
    assert span.status.status_code == StatusCode.ERROR
    assert "gen_ai.usage.input_tokens" not in a  # nothing was answered
    (attempt,) = children(exporter, span)
    assert attempt.attributes["http.response.status_code"] == 500
    assert attempt.attributes["error.type"] == "upstream_error"
    assert attempt.status.status_code == StatusCode.ERROR


def test_a_request_refused_before_any_upstream_still_has_its_span(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer, client_context: ClientContext
) -> None:
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        with pytest.raises(openai.NotFoundError):
            sdk(url).chat.completions.create(
                model="no-such-model", messages=MESSAGES, extra_headers=client_context.headers
            )
        # a body the spec refuses (no messages): recorded, and traced, as a 400
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o"}, headers=client_context.headers)
        assert r.status_code == 400
    spans = sorted(
        (s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER),
        key=lambda s: s.start_time or 0,
    )
    assert len(spans) == 2
    unknown, invalid = spans
    assert unknown.name == "chat no-such-model"
    assert unknown.attributes["error.type"] == "model_not_found"
    assert unknown.attributes["http.response.status_code"] == 404
    assert unknown.status.status_code == StatusCode.UNSET  # the client's mistake, not the server's
    assert invalid.attributes["http.response.status_code"] == 400
    assert "error.type" in invalid.attributes
    for s in spans:
        assert hex_trace(s) == client_context.trace_id
        assert children(exporter, s) == []
    assert len(httpserver.log) == 0


def test_content_is_recorded_only_with_the_setting_and_bounded(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer, otel_env: pytest.MonkeyPatch
) -> None:
    otel_env.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    otel_env.setenv("LLM_BACKEND_OTEL_CONTENT_MAX_CHARS", "2000")
    tool_reply = azure_chat_completion()
    tool_reply["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }
    tool_reply["choices"][0]["finish_reason"] = "tool_calls"
    httpserver.expect_ordered_request(AZURE_CHAT_PATH, method="POST").respond_with_json(
        azure_chat_completion("Hi!")
    )
    httpserver.expect_ordered_request(AZURE_CHAT_PATH, method="POST").respond_with_json(tool_reply)
    httpserver.expect_ordered_request(AZURE_CHAT_PATH, method="POST").respond_with_data(
        sse_body(*azure_stream_chunks()), content_type="text/event-stream"
    )
    long_prompt = "x" * 10_000
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        client = sdk(url)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": long_prompt}])
        list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    spans = sorted(
        (s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER),
        key=lambda s: s.start_time or 0,
    )
    plain, tools, streamed = (s.attributes for s in spans)
    assert orjson.loads(plain["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "You are terse."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Say hello, secret-prompt-words"}]},
    ]
    assert orjson.loads(plain["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Hi!"}], "finish_reason": "stop"}
    ]
    # the long prompt is cut to the bound, the JSON kept whole
    assert len(tools["gen_ai.input.messages"]) <= 2000
    (message,) = orjson.loads(tools["gen_ai.input.messages"])
    assert message["parts"][0]["content"].startswith("xxxx") and message["parts"][0]["content"].endswith("…")
    assert orjson.loads(tools["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [
                {"type": "tool_call", "id": "call_1", "name": "weather", "arguments": {"city": "Oslo"}}
            ],
            "finish_reason": "tool_calls",
        }
    ]
    assert orjson.loads(streamed["gen_ai.output.messages"])[0]["parts"] == [
        {"type": "text", "content": "Hello! How can I help?"}
    ]
    # content goes on the request's span only, never on the attempts
    for s in exporter.get_finished_spans():
        if s.kind == SpanKind.CLIENT:
            assert "gen_ai.input.messages" not in s.attributes


def test_service_name_defaults_and_follows_otel_service_name(
    exporter: InMemorySpanExporter, serve: Any, otel_env: pytest.MonkeyPatch
) -> None:
    from tests.conftest import mock_model

    with serve([mock_model()]) as url:
        sdk(url).chat.completions.create(model="mock", messages=MESSAGES)
    otel_env.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    with serve([mock_model()]) as url:
        sdk(url).chat.completions.create(model="mock", messages=MESSAGES)
    first, second = sorted(
        (s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER),
        key=lambda s: s.start_time or 0,
    )
    assert first.resource.attributes["service.name"] == "llm-backend"
    assert second.resource.attributes["service.name"] == "gateway-eu"
    assert second.resource.attributes["deployment.environment.name"] == "test"
    assert first.attributes["gen_ai.provider.name"] == "llm_backend.mock"


def test_sampler_from_the_environment_drops_spans_but_still_propagates(
    exporter: InMemorySpanExporter, serve: Any, httpserver: HTTPServer, otel_env: pytest.MonkeyPatch
) -> None:
    otel_env.setenv("OTEL_TRACES_SAMPLER", "always_off")
    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_json(azure_chat_completion())
    with serve([gpt4o(azure_backend(httpserver))]) as url:
        sdk(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert exporter.get_finished_spans() == ()
    (sent,) = traceparents(httpserver)
    assert sent is not None
    assert int(sent.split("-")[3], 16) & 1 == 0  # a context, marked not sampled
