"""The backend interface every upstream implements, and the SSE reader shared by them."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from llm_backend.config import BackendConfig

# Operations a backend can be asked for, as the path suffix OpenAI and Azure both use.
CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
RESPONSES = "responses"
RESPONSES_INPUT_TOKENS = "responses/input_tokens"
# The operations Azure's deployment-style API serves under /openai/deployments/{deployment}/; every other
# one (the Responses API) lives at /openai/<suffix>?api-version=… there, with the deployment as `model`.
DEPLOYMENT_SCOPED = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})
#: Headers the upstream requests made in this context carry besides their own: the attempt's trace context
#: (`traceparent`, `tracestate`) when tracing is on; None (nothing added) otherwise.
request_headers: ContextVar[Mapping[str, str] | None] = ContextVar("upstream_request_headers", default=None)


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A complete (non-streamed) upstream answer: the body bytes exactly as the upstream sent them."""

    status_code: int
    content: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class UpstreamStream(abc.ABC):
    """An opened upstream stream whose status was 2xx: yields each SSE `data:` payload, `[DONE]` excluded.

    A stream opened with `events=True` yields `(event block, data)` pairs instead: the event's bytes exactly
    as the upstream sent them (its `event:` line included) and its data, and treats the end of the bytes as
    the end of the stream (typed-event streams have no `[DONE]`; their last event says how they ended).
    """

    headers: Mapping[str, str] = {}

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop reading and release the upstream connection (cancels the upstream generation)."""


class Backend(abc.ABC):
    """One upstream deployment/server. Implementations raise llm_backend.upstream.errors on failure."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.provider = config.provider

    def upstream_model(self, requested: str) -> str:
        """The deployment or model name the upstream will see, for records and logs."""
        return self.config.deployment or self.config.model or requested

    def rewrites_model(self) -> bool:
        """True when the body's `model` must be replaced by the upstream model name before sending."""
        return False

    def body_model(self, operation: str) -> str | None:
        """The `model` the upstream must find in the body of `operation`, when it is not the client's."""
        return self.config.model if self.rewrites_model() else None

    @abc.abstractmethod
    async def post(self, operation: str, body: bytes, *, model: str) -> UpstreamResponse:
        """Send a non-streaming request; return the 2xx answer or raise an UpstreamError."""

    @abc.abstractmethod
    async def open_stream(
        self, operation: str, body: bytes, *, model: str, events: bool = False
    ) -> UpstreamStream:
        """Send a streaming request and return once the upstream answered 2xx; raise an UpstreamError else.

        `events=True` (typed-event streams) makes the stream yield `(event block, data)` pairs."""

    async def send(
        self, method: str, path: str, body: bytes | None = None, *, query: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        """A call on a stored resource (`responses/{id}`…): the 2xx answer, or an UpstreamError."""
        raise NotImplementedError(f"backend {self.name!r} does not serve stored resources")

    async def list_models(self) -> list[dict[str, object]] | None:
        """The upstream's model list if it can give one cheaply; None when unknown."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (lifespan shutdown)."""


DONE = b"[DONE]"  # the data of the event that ends a chat/completions stream


class SseSplitter:
    """Splits bytes, fed as they arrive, into SSE events: `(block, data)` for every event that has data, the
    block being the event's lines as sent (`event:`, `data:`, `id:`…, without the blank line that ends it).
    Synchronous, so that a stream's reader awaits only its socket."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events: list[tuple[bytes, bytes]] = []
        while (end := buffer.find(b"\n\n")) >= 0:
            block, buffer = buffer[:end], buffer[end + 2 :]
            data = _event_data(block)
            if data is not None:
                events.append((block, data))
        self._buffer = buffer
        return events

    def close(self) -> list[tuple[bytes, bytes]]:
        """The last event, when the bytes end without the blank line after it."""
        rest, self._buffer = self._buffer.strip(b"\n"), b""
        data = _event_data(rest) if rest else None
        return [(rest, data)] if data is not None else []


def _event_data(block: bytes) -> bytes | None:
    if block.startswith(b"data:") and b"\n" not in block:
        return block[6:] if block[5:6] == b" " else block[5:]
    lines = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines) if lines else None
