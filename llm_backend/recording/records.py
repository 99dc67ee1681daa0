"""The records the serving path hands to the recorder: plain frozen dataclasses, no I/O."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from llm_backend.db.storable import NUL, storable


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
# The process serving it ended first (SIGKILL, OOM): recorded from the journal, tokens estimated.
OUTCOME_INTERRUPTED = "interrupted"


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
    # what the usage cost at the prices of the model that answered (llm_backend.services.pricing);
    # None when that model has no prices configured
    cost: float | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # time to first token (streams)
    key_id: str | None = None
    user: str | None = None  # the signed-in caller's subject, else the request body's "user" field
    user_id: str | None = None  # the user the request counted for (users.id)
    team_id: str | None = None  # the team it counted for (teams.id)
    client_ip: str | None = None
    conversation_id: str | None = None  # explicit X-Conversation-Id, or resolved by threading
    external_conversation_id: str | None = None  # the client's own chat id (e.g. X-OpenWebUI-Chat-Id)
    client_request_id: str | None = None  # the client's own id for the request (sanitized), if it sent one
    # request_messages are new turns of conversation_id, to append as they are (a Responses API chain)
    continues: bool = False
    # Conversation content; None when RECORD_CONTENT=false or the operation has no messages.
    request_messages: list[dict[str, Any]] | None = None
    response_message: dict[str, Any] | None = None


def record_owner(record: RequestRecord) -> str | None:
    """Who owns the conversation a record threads into: its user when it has one (users of one shared
    front-end key never thread into each other's conversations), else its key."""
    return record.user_id or record.key_id


_TEXT_FIELDS = tuple(
    f.name for f in dataclasses.fields(RequestRecord) if f.name not in ("created_at", "usage", "stream")
)


def storable_record(record: RequestRecord) -> RequestRecord:
    """The record with every text storable (NUL replaced, see llm_backend.db.storable), message content
    included; the same record when nothing needed replacing."""
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, str):
            if NUL in value:
                changes[name] = storable(value)
        elif isinstance(value, list | dict) and _may_hold_nul(value):
            clean = storable(value)
            if clean is not value:
                changes[name] = clean
    return dataclasses.replace(record, **changes) if changes else record


def _may_hold_nul(value: Any) -> bool:
    """Whether a JSON-like value may hold a NUL: one orjson pass (NUL is written as \\u0000), about half
    what a walk in Python costs on a long chat history (the writer thread does this for every record)."""
    try:
        return b"\\u0000" in orjson.dumps(value)
    except TypeError:  # not plain JSON: walk it
        return True
