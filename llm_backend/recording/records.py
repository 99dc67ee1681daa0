"""The records the serving path hands to the recorder: plain frozen dataclasses, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request; `estimated` is True when the upstream gave no usage and we counted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    estimated: bool = False


# Outcomes of a request, as recorded.
OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"  # the request failed (our validation, limits, or the upstream)
OUTCOME_CLIENT_DISCONNECTED = "client_disconnected"  # the client went away mid-stream


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request through the gateway, keyed by our own request id (never the provider's)."""

    request_id: str
    created_at: datetime  # timezone-aware UTC, when the request arrived
    route: str  # the route template served, e.g. "/v1/chat/completions"
    operation: str  # "chat" | "completions" | "embeddings" | "models" | "conversation"
    status_code: int
    outcome: str = OUTCOME_OK
    error_type: str | None = None  # OpenAI error type/code when outcome != ok
    stream: bool = False
    model_requested: str | None = None  # what the client sent as "model" (or the Azure deployment name)
    model: str | None = None  # our canonical model name that answered
    provider: str | None = None  # azure | openai | mock
    backend: str | None = None  # backend id (e.g. "gpt-4o/0" or its configured name)
    deployment: str | None = None  # the upstream deployment/model that answered
    attempts: int = 1
    usage: Usage = field(default_factory=Usage)
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # time to first token (streams)
    key_id: str | None = None
    user: str | None = None  # the request body's "user" field
    client_ip: str | None = None
    conversation_id: str | None = None  # explicit X-Conversation-Id, or resolved by threading
    # request_messages are new turns of conversation_id, to append as they are (a Responses API chain)
    continues: bool = False
    # Conversation content; None when RECORD_CONTENT=false or the operation has no messages.
    request_messages: list[dict[str, Any]] | None = None
    response_message: dict[str, Any] | None = None
