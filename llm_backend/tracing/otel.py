"""The OpenTelemetry side of tracing: a SERVER span per model call, a CLIENT span per upstream attempt.

Spans follow the OpenTelemetry GenAI semantic conventions (`{gen_ai.operation.name} {gen_ai.request.model}`,
`gen_ai.*` attributes) plus our own `llm_backend.*` ones. Only imported when tracing is on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import orjson
from opentelemetry import propagate
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from llm_backend.recording.records import (
    OUTCOME_CLIENT_DISCONNECTED,
    OUTCOME_ERROR,
    OUTCOME_OK,
    RequestRecord,
)
from llm_backend.tracing import DEFAULT_SERVICE_NAME, TracingConfig
from llm_backend.upstream.base import Backend, request_headers
from llm_backend.upstream.errors import UpstreamError

if TYPE_CHECKING:
    from llm_backend.services.flight import Flight

logger = logging.getLogger(__name__)

SCOPE = "llm_backend"
#: Our operation names (request_log.operation) as GenAI operation names; the others are kept as they are.
OPERATION_NAMES = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
}
#: `openai.api.type` of the operations that have one.
API_TYPES = {"chat": "chat_completions", "responses": "responses"}
#: `gen_ai.provider.name` of our backend providers.
PROVIDERS = {"azure": "azure.ai.openai", "openai": "openai", "mock": "llm_backend.mock"}
MAX_TEXT = 256  # longest string a client sent that goes into an attribute
MAX_STOP = 8  # stop sequences kept
_FLOAT_PARAMS = (
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
)
_MAX_TOKENS_PARAMS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_TERMINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})

Send = Callable[[Backend], Awaitable[Any]]


def make_exporter(name: str) -> SpanExporter:
    """The span exporter OTEL_TRACES_EXPORTER names; the OTLP one reads its OTEL_EXPORTER_OTLP_* itself."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def make_resource() -> Resource:
    """The SDK's resource (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME), named llm-backend when unnamed."""
    resource = Resource.create()
    name = resource.attributes.get(SERVICE_NAME)
    if not name or str(name).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _short(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def request_attributes(flight: Flight, operation: str) -> dict[str, Any]:
    """What the request asked for: the GenAI request attributes, and who asked (never a secret)."""
    caller = flight.caller
    body = flight.body
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.stream": flight.stream,
        "llm_backend.request_id": caller.request_id,
        "llm_backend.operation": flight.op.name,
        "url.path": _short(caller.route) or "",
    }
    model = _short(flight.requested)
    if model is not None:
        attrs["gen_ai.request.model"] = model
    api_type = API_TYPES.get(flight.op.name)
    if api_type is not None:
        attrs["openai.api.type"] = api_type
    for name, value in (
        ("llm_backend.key_id", caller.key_id),
        ("llm_backend.key_name", _short(caller.key_name)),
        ("client.address", caller.client_ip),
        ("llm_backend.client_request_id", _short(caller.client_request_id)),
    ):
        if value:
            attrs[name] = value
    for param, name in _FLOAT_PARAMS:
        number = _number(body.get(param))
        if number is not None:
            attrs[name] = number
    for param in _MAX_TOKENS_PARAMS:
        tokens = _integer(body.get(param))
        if tokens is not None:
            attrs["gen_ai.request.max_tokens"] = tokens
            break
    seed = _integer(body.get("seed"))
    if seed is not None:
        attrs["gen_ai.request.seed"] = seed
    n = _integer(body.get("n"))
    if n is not None and n != 1:
        attrs["gen_ai.request.choice.count"] = n
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = [s[:MAX_TEXT] for s in stop[:MAX_STOP]]
    output_type = _output_type(body)
    if output_type is not None:
        attrs["gen_ai.output.type"] = output_type
    tier = _short(body.get("service_tier"))
    if tier is not None and tier != "auto":
        attrs["openai.request.service_tier"] = tier
    encoding = _short(body.get("encoding_format"))
    if encoding is not None:
        attrs["gen_ai.request.encoding_formats"] = [encoding]
    dimensions = _integer(body.get("dimensions"))
    if dimensions is not None:
        attrs["gen_ai.embeddings.dimension.count"] = dimensions
    return attrs


def _output_type(body: dict[str, Any]) -> str | None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        text = body.get("text")  # the Responses API's `text.format`
        fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_schema", "json_object"):
        return "json"
    if kind == "text":
        return "text"
    return None


# -- content (only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT) -----------------------------------


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "content": text}


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat message's content as the conventions' parts: text, tool calls, tool results; other parts (an
    image, audio) by their type only, never their data."""
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if message.get("role") == "tool":
        parts.append(
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": content if isinstance(content, str) else _joined_text(content),
            }
        )
    elif isinstance(content, str):
        parts.append(_text_part(content))
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                parts.append(_text_part(part))
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(_text_part(text))
                elif isinstance(part.get("type"), str):
                    parts.append({"type": part["type"][:64]})
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if not isinstance(call, dict):
                continue
            fn = call.get("function")
            if not isinstance(fn, dict):
                fn = {}
            arguments: Any = fn.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = orjson.loads(arguments)
                except orjson.JSONDecodeError:
                    pass
            parts.append(
                {"type": "tool_call", "id": call.get("id"), "name": fn.get("name"), "arguments": arguments}
            )
    return parts


def _joined_text(content: Any) -> str:
    if not isinstance(content, list):
        return ""
    return "".join(
        p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if isinstance(message, dict):
            role = message.get("role")
            out.append({"role": role if isinstance(role, str) else "user", "parts": _parts(message)})
    return out


def _cut(value: Any, limit: int) -> Any:
    """`value` with every string longer than `limit` cut to it (marked), its structure kept."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    if isinstance(value, list):
        return [_cut(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v, limit) for k, v in value.items()}
    return value


def bounded_json(items: list[Any], max_chars: int) -> str:
    """`items` as JSON of at most `max_chars` characters: long strings are cut shorter until it fits, then
    the earliest items are dropped (the last ones, nearest the answer, are kept; order is kept)."""
    text = orjson.dumps(items).decode()
    limit = max_chars
    cut = items
    while len(text) > max_chars and limit > 64:
        limit //= 2
        cut = _cut(items, limit)
        text = orjson.dumps(cut).decode()
    if len(text) <= max_chars:
        return text
    # keep the longest run of last items that fits (each costs its JSON and a comma)
    room = max_chars - 2
    start = len(cut)
    while start > 0:
        size = len(orjson.dumps(cut[start - 1])) + 1
        if size > room:
            break
        room -= size
        start -= 1
    text = orjson.dumps(cut[start:]).decode()
    return text if len(text) <= max_chars else "[]"


# -- the tracer -----------------------------------------------------------------------------------------


class Tracer:
    """Makes the spans of this worker's requests; one per worker, created in the lifespan after the fork."""

    def __init__(
        self, provider: TracerProvider, *, capture_content: bool = False, content_max_chars: int = 16_384
    ) -> None:
        self.provider = provider
        self.otel = provider.get_tracer(SCOPE)
        self.propagator = propagate.get_global_textmap()
        #: the request headers that carry a trace context (OTEL_PROPAGATORS; W3C traceparent/tracestate)
        self.inbound_fields = tuple(sorted(f.lower().encode("latin-1") for f in self.propagator.fields))
        self.capture_content = capture_content
        self.content_max_chars = content_max_chars
        self._servers: dict[str, tuple[str | None, int | None]] = {}

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracer:
        # the lifespan shuts it down (flushing what is queued); no atexit hook of its own
        provider = TracerProvider(resource=make_resource(), shutdown_on_exit=False)
        for name in config.exporters:
            provider.add_span_processor(BatchSpanProcessor(make_exporter(name)))
        return cls(
            provider, capture_content=config.capture_content, content_max_chars=config.content_max_chars
        )

    async def shutdown(self) -> None:
        """Export what is still queued, then stop (in a thread: the exporter blocks)."""
        try:
            await anyio.to_thread.run_sync(self.provider.shutdown)
        except Exception:
            logger.exception("shutting tracing down failed")

    def server_of(self, backend: Backend) -> tuple[str | None, int | None]:
        """The upstream's host and port (server.address, server.port), from its endpoint or base URL."""
        cached = self._servers.get(backend.name)
        if cached is None:
            url = backend.config.endpoint or backend.config.base_url
            host: str | None = None
            port: int | None = None
            if url:
                try:
                    parts = urlsplit(url)
                    host = parts.hostname
                    port = parts.port or (
                        443 if parts.scheme == "https" else 80 if parts.scheme == "http" else None
                    )
                except ValueError:
                    host = port = None
            cached = self._servers[backend.name] = (host, port)
        return cached

    # -- the hooks the services call ---------------------------------------------------------------------

    def traced(self, flight: Flight, send: Send, *, hold: bool) -> Send:
        """`send` (one upstream attempt) wrapped in a child span of the request's, carrying its context to
        the upstream. With `hold` (a stream) the winning attempt's span stays open until the stream ends."""
        request = self.begin(flight)

        async def attempt(backend: Backend) -> Any:
            return await request.attempt(backend, send, hold)

        return attempt

    def begin(self, flight: Flight) -> RequestSpan:
        """The request's span, started (backdated to the request's arrival) if it is not yet."""
        caller = flight.caller
        request = caller.trace
        if request is None:
            request = caller.trace = RequestSpan(self, flight)
        return request  # type: ignore[no-any-return]

    def ended(self, flight: Flight, record: RequestRecord, reply: dict[str, Any] | None) -> None:
        """The request's outcome is settled (its record was just handed on): finish and end its span."""
        request = self.begin(flight)
        flight.caller.trace = None
        try:
            request.end(flight, record, reply)
        except Exception:  # tracing must never break serving
            logger.exception("ending a request's span failed")
            request.span.end()


class RequestSpan:
    """One request's span and what the answer told of itself while it passed (id, model, finish reasons)."""

    __slots__ = (
        "attempts",
        "context",
        "fingerprint",
        "finish_reasons",
        "held",
        "operation",
        "recording",
        "requested",
        "response_id",
        "response_model",
        "retry_reason",
        "service_tier",
        "span",
        "start_ns",
        "tracer",
    )

    def __init__(self, tracer: Tracer, flight: Flight) -> None:
        caller = flight.caller
        self.tracer = tracer
        self.operation = OPERATION_NAMES.get(flight.op.name, flight.op.name)
        model = _short(flight.requested)
        self.requested = flight.requested
        parent = tracer.propagator.extract(caller.trace_context or {})
        self.start_ns = int(caller.created_at.timestamp() * 1e9)
        self.span: Span = tracer.otel.start_span(
            f"{self.operation} {model}" if model else self.operation,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=request_attributes(flight, self.operation),
            start_time=self.start_ns,
        )
        self.context = set_span_in_context(self.span, parent)
        self.recording = self.span.is_recording()
        self.attempts = 0
        self.retry_reason: str | None = None
        self.held: Span | None = None  # a stream's attempt span, open until the stream ends
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reasons: dict[int, str] = {}
        self.fingerprint: str | None = None
        self.service_tier: str | None = None

    def saw(self, data: Any) -> None:
        """An answer, a stream chunk or a Responses event's response object went by: note what it names."""
        if not self.recording or not isinstance(data, dict):
            return
        if self.response_id is None:
            self.response_id = _short(data.get("id"))
        if self.response_model is None:
            self.response_model = _short(data.get("model"))
        choices = data.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    reason = choice.get("finish_reason")
                    if isinstance(reason, str) and reason:
                        index = choice.get("index", 0)
                        self.finish_reasons[index if isinstance(index, int) else 0] = reason[:64]
        elif data.get("object") == "response":
            status = data.get("status")
            if status in _TERMINAL_STATUSES:
                self.finish_reasons[0] = _response_finish(data, status)
        if self.fingerprint is None:
            self.fingerprint = _short(data.get("system_fingerprint"))
        tier = _short(data.get("service_tier"))
        if tier is not None:
            self.service_tier = tier

    async def attempt(self, backend: Backend, send: Send, hold: bool) -> Any:
        self.attempts += 1
        model = backend.upstream_model(self.requested or "")
        provider = PROVIDERS.get(backend.provider, backend.provider)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.provider.name": provider,
            "llm_backend.backend": backend.name,
            "llm_backend.attempt": self.attempts,
        }
        if model:
            attrs["gen_ai.request.model"] = model[:MAX_TEXT]
            attrs["llm_backend.deployment"] = model[:MAX_TEXT]
        host, port = self.tracer.server_of(backend)
        if host:
            attrs["server.address"] = host
            if port:
                attrs["server.port"] = port
        if self.retry_reason is not None:
            attrs["llm_backend.retry_reason"] = self.retry_reason
        span = self.tracer.otel.start_span(
            f"{self.operation} {model[:MAX_TEXT]}" if model else self.operation,
            context=self.context,
            kind=SpanKind.CLIENT,
            attributes=attrs,
        )
        carrier: dict[str, str] = {}
        self.tracer.propagator.inject(carrier, context=set_span_in_context(span, self.context))
        token = request_headers.set(carrier)
        try:
            result = await send(backend)
        except UpstreamError as exc:
            _attempt_failed(span, exc)
            span.end()
            self.retry_reason = exc.failover_kind
            raise
        except BaseException as exc:  # cancelled (the client went away) or a bug
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, "the attempt was abandoned"))
            span.end()
            raise
        finally:
            request_headers.reset(token)
        status = getattr(result, "status_code", None)
        span.set_attribute("http.response.status_code", status if isinstance(status, int) else 200)
        if hold:
            self.held = span
        else:
            span.end()
        return result

    def end(self, flight: Flight, record: RequestRecord, reply: dict[str, Any] | None) -> None:
        span = self.span
        held, self.held = self.held, None
        if held is not None:  # a stream's upstream exchange ends with the stream
            if record.outcome == OUTCOME_ERROR:
                held.set_attribute("error.type", record.error_type or "_OTHER")
                held.set_status(Status(StatusCode.ERROR, "the stream broke off"))
            elif record.outcome != OUTCOME_OK:
                held.set_attribute("llm_backend.outcome", record.outcome)
            held.end()
        if not self.recording:
            span.end()
            return
        attrs: dict[str, Any] = {
            "http.response.status_code": record.status_code,
            "llm_backend.outcome": record.outcome,
            "llm_backend.attempts": record.attempts,
        }
        if record.key_id:  # known only after authentication, which runs after the span may have started
            attrs["llm_backend.key_id"] = record.key_id
        if flight.caller.key_name:
            attrs["llm_backend.key_name"] = flight.caller.key_name[:MAX_TEXT]
        provider = record.provider
        if provider is None and flight.route is not None and flight.route.backends:
            provider = flight.route.backends[0].backend.provider
        if provider is not None:
            attrs["gen_ai.provider.name"] = PROVIDERS.get(provider, provider)
        for name, value in (
            ("llm_backend.model", record.model),
            ("llm_backend.backend", record.backend),
            ("llm_backend.deployment", record.deployment),
            ("gen_ai.conversation.id", _short(record.conversation_id or record.external_conversation_id)),
            ("gen_ai.response.id", self.response_id),
            ("gen_ai.response.model", self.response_model),
            ("openai.response.system_fingerprint", self.fingerprint),
            ("openai.response.service_tier", self.service_tier),
        ):
            if value:
                attrs[name] = value
        if self.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = [
                self.finish_reasons[i] for i in sorted(self.finish_reasons)
            ]
        if record.provider is not None:  # it reached a backend and was answered: usage is the answer's
            usage = record.usage
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
            attrs["llm_backend.tokens_estimated"] = usage.estimated
            if usage.cached_tokens is not None:
                attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.reasoning_tokens is not None:
                attrs["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if flight.state is not None:
                host, port = self.tracer.server_of(flight.state.backend)
                if host:
                    attrs["server.address"] = host
                    if port:
                        attrs["server.port"] = port
        if record.ttft_ms is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = record.ttft_ms / 1000
            span.add_event("llm_backend.first_token", timestamp=self.start_ns + int(record.ttft_ms * 1e6))
        if self.tracer.capture_content:
            attrs.update(self._content(flight, record, reply))
        if record.outcome == OUTCOME_ERROR:
            attrs["error.type"] = record.error_type or "_OTHER"
            # a 4xx answer is the client's (HTTP conventions); a 5xx, or a stream that broke off after its
            # 200, is the server's
            if not 400 <= record.status_code < 500:
                span.set_status(Status(StatusCode.ERROR, record.error_type or None))
        elif record.outcome == OUTCOME_CLIENT_DISCONNECTED:
            span.add_event("llm_backend.client_disconnected")
        span.set_attributes(attrs)
        span.end()

    def _content(self, flight: Flight, record: RequestRecord, reply: dict[str, Any] | None) -> dict[str, str]:
        """gen_ai.input.messages / gen_ai.system_instructions / gen_ai.output.messages, each bounded."""
        limit = self.tracer.content_max_chars
        out: dict[str, str] = {}
        body = flight.body
        messages = flight.op.messages(body) if flight.op.name in ("chat", "responses") else None
        if messages is None and flight.op.name == "completions" and isinstance(body.get("prompt"), str):
            messages = [{"role": "user", "content": body["prompt"]}]
        instructions = body.get("instructions") if flight.op.name == "responses" else None
        if isinstance(instructions, str) and instructions:
            out["gen_ai.system_instructions"] = bounded_json([_text_part(instructions)], limit)
            if (
                messages
                and messages[0].get("role") == "system"
                and messages[0].get("content") == instructions
            ):
                messages = messages[1:]
        if messages:
            out["gen_ai.input.messages"] = bounded_json(_messages(messages), limit)
        if reply is not None and record.outcome != OUTCOME_ERROR:
            message: dict[str, Any] = {"role": "assistant", "parts": _parts(reply)}
            if 0 in self.finish_reasons:
                message["finish_reason"] = self.finish_reasons[0]
            out["gen_ai.output.messages"] = bounded_json([message], limit)
        return out


def _response_finish(response: dict[str, Any], status: str) -> str:
    """A Responses API response's status as a finish reason: `stop` (or `tool_calls`) when completed, the
    reason it is incomplete (`max_output_tokens`, `content_filter`), else the status itself."""
    if status == "completed":
        output = response.get("output")
        if isinstance(output, list) and any(
            isinstance(item, dict) and item.get("type") == "function_call" for item in output
        ):
            return "tool_calls"
        return "stop"
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return reason[:64] if isinstance(reason, str) and reason else "incomplete"
    return status


def _attempt_failed(span: Span, exc: UpstreamError) -> None:
    span.set_attribute("error.type", exc.code or exc.error_type or type(exc).__name__)
    span.set_attribute("llm_backend.failover_kind", exc.failover_kind)
    span.set_attribute("llm_backend.retryable", exc.retryable)
    if exc.upstream_status is not None:
        span.set_attribute("http.response.status_code", exc.upstream_status)
    span.set_status(Status(StatusCode.ERROR, exc.message[:MAX_TEXT]))
