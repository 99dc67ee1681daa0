"""The per-request objects: who is asking (Caller) and one forwarded request with its outcome (Flight)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from llm_backend.recording.records import RequestRecord, Usage

if TYPE_CHECKING:
    from llm_backend.services.operations import Operation
    from llm_backend.upstream.router import BackendState, ModelRoute


class RecordSink(Protocol):
    """Where records go. A sink may also have `started(record)`: a provisional record, journaled when the
    upstream is asked, for the request to be recorded even if the process dies before it ends."""

    def submit(self, record: RequestRecord) -> None: ...


class NullSink:
    """Recording switched off."""

    def submit(self, record: RequestRecord) -> None:
        return None


class Admission(Protocol):
    """What access control hands back for an admitted request; settled once with the real usage."""

    headers: dict[str, str]

    async def settle(self, total_tokens: int, usage: Usage | None = None) -> None: ...


Admit = Callable[..., Any]  # (caller, route, body, operation) -> Admission | None
OnReply = Callable[[dict[str, Any] | None, Usage, str], Awaitable[None]]


@dataclass(slots=True)
class Caller:
    """Who is asking and how, as the API layer saw it. `log` collects fields for the access log line."""

    request_id: str
    route: str
    client_ip: str | None = None
    key_id: str | None = None
    allowed_models: frozenset[str] | None = None  # None: every model
    key_name: str | None = None
    is_admin: bool = False
    limits: Any = None  # llm_backend.limits.KeyLimits of the key, when it has any
    user_id: str | None = None  # the user the request counts for (users.id)
    team_id: str | None = None  # the team it counts for (teams.id)
    levels: tuple[Any, ...] = ()  # llm_backend.limits.Level of the user and team, besides the key's
    member: Any = None  # llm_backend.services.org.Member, when a user is known
    conversation_id: str | None = None
    external_conversation_id: str | None = None  # the client's chat id (CONVERSATION_ID_HEADERS), per key
    client_request_id: str | None = None  # the id the client sent for the request (ours is request_id)
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    log: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False
    record_messages: bool = True
    # tracing (both None unless it is on): the client's trace-context headers, and the request's span
    trace_context: dict[str, str] | None = None
    trace: Any = None  # llm_backend.tracing.otel.RequestSpan, from the first upstream attempt to the record
    identity: Any = None  # llm_backend.services.oidc.Identity of a caller signed in with an OIDC token

    @property
    def owner(self) -> str | None:
        """Whose stored responses (and conversations) the caller's are: its user's, else its key's; a token's
        subject where no database knows users."""
        if self.user_id is not None or self.key_id is not None:
            return self.user_id or self.key_id
        if self.identity is not None:
            return f"oidc:{_subject_digest(self.identity.issuer, self.identity.subject)}"
        return None


def _subject_digest(issuer: str, subject: str) -> str:
    import hashlib

    return hashlib.sha256(f"{issuer}|{subject}".encode()).hexdigest()[:40]


@dataclass(slots=True)
class Flight:
    """One request through forward(): what was asked (fixed when it is built) and what became of it.

    Settling the limiter's reservation and recording happen once, in llm_backend.services.accounting,
    whatever ends the request.
    """

    op: Operation
    caller: Caller
    body: dict[str, Any]
    requested: str | None  # the model the client named (or the Azure deployment of the path)
    stream: bool
    route: ModelRoute | None = None
    admission: Any = None
    state: BackendState | None = None
    attempts: int = 0
    settled: bool = False
    on_reply: OnReply | None = None
    conversation_id: str | None = None  # the conversation to record into (explicit, or a Responses chain)
    continues: bool = False  # the recorded messages are new turns of `conversation_id` as they are
    pinned: str | None = None  # the response id whose backend this request must go to (Responses API)
    # the model the upstream says answered (its `model`: a snapshot name, or a model router's pick)
    answered_model: str | None = None
    # sees the response object of a JSON answer, or the first one of a typed-event stream
    on_response: Callable[[Flight, dict[str, Any]], None] | None = None

    @property
    def trace(self) -> Any:
        """The request's span (llm_backend.tracing.otel.RequestSpan); None unless tracing is on."""
        return self.caller.trace


@dataclass(frozen=True, slots=True)
class JsonResult:
    content: bytes
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamResult:
    frames: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)
