"""SQLAlchemy 2 models: the request log and its rollups, conversations and their messages, api keys, teams
and users, console sessions."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from llm_backend.db.base import Base, JSONType, UTCDateTime, utcnow
from llm_backend.db.ids import new_api_key_id, new_team_id, new_user_id, new_uuid7
from llm_backend.db.storable import storable

logger = logging.getLogger(__name__)

# Integer primary keys: BIGINT on PostgreSQL, INTEGER on SQLite (only INTEGER PRIMARY KEY is the rowid).
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class RequestLog(Base):
    """One row per request through the gateway, keyed by our own request id."""

    __tablename__ = "request_log"

    request_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    route: Mapped[str] = mapped_column(sa.String(255))
    operation: Mapped[str] = mapped_column(sa.String(32))
    status_code: Mapped[int] = mapped_column(sa.Integer)
    outcome: Mapped[str] = mapped_column(sa.String(32))
    error_type: Mapped[str | None] = mapped_column(sa.String(255))
    stream: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    model_requested: Mapped[str | None] = mapped_column(sa.String(255))
    model: Mapped[str | None] = mapped_column(sa.String(255))
    provider: Mapped[str | None] = mapped_column(sa.String(32))
    backend: Mapped[str | None] = mapped_column(sa.String(255))
    deployment: Mapped[str | None] = mapped_column(sa.String(255))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=1)
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cached_tokens: Mapped[int | None] = mapped_column(sa.Integer)
    reasoning_tokens: Mapped[int | None] = mapped_column(sa.Integer)
    tokens_estimated: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    latency_ms: Mapped[float] = mapped_column(sa.Float, default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(sa.Float)
    key_id: Mapped[str | None] = mapped_column(sa.String(64))
    user: Mapped[str | None] = mapped_column(sa.String(255))
    client_ip: Mapped[str | None] = mapped_column(sa.String(64))
    conversation_id: Mapped[str | None] = mapped_column(sa.String(64))
    # what the client sent as its own id (X-Client-Request-Id, x-ms-client-request-id or X-Request-Id)
    client_request_id: Mapped[str | None] = mapped_column(sa.String(512))
    # the request's cost at the prices of the model that answered, in the prices' currency (USD as
    # providers bill); NULL when that model has no prices configured
    cost: Mapped[float | None] = mapped_column(sa.Float)
    # the user and team the request counted against (users.id, teams.id), if any
    user_id: Mapped[str | None] = mapped_column(sa.String(64))
    team_id: Mapped[str | None] = mapped_column(sa.String(64))

    __table_args__ = (
        sa.Index("ix_request_log_created_at", "created_at"),
        sa.Index("ix_request_log_user_id_created_at", "user_id", "created_at"),
        sa.Index("ix_request_log_team_id_created_at", "team_id", "created_at"),
        sa.Index("ix_request_log_key_id_created_at", "key_id", "created_at"),
        sa.Index("ix_request_log_model_created_at", "model", "created_at"),
        sa.Index("ix_request_log_conversation_id", "conversation_id"),
        sa.Index("ix_request_log_client_request_id", "client_request_id"),
        # the request log page's filters (newest first within each)
        sa.Index("ix_request_log_backend_created_at", "backend", "created_at"),
        sa.Index("ix_request_log_outcome_created_at", "outcome", "created_at"),
        sa.Index("ix_request_log_user_created_at", "user", "created_at"),
        sa.Index("ix_request_log_client_ip_created_at", "client_ip", "created_at"),
    )


class Conversation(Base):
    """A conversation: its metadata, token totals and the hash of its full transcript (for threading)."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default=new_uuid7)
    title: Mapped[str | None] = mapped_column(sa.String(255))
    owner: Mapped[str | None] = mapped_column(sa.String(64))
    model: Mapped[str | None] = mapped_column(sa.String(255))
    system_prompt: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default=sa.text("0"))
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default=sa.text("0"))
    total_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default=sa.text("0"))
    message_count: Mapped[int] = mapped_column(sa.Integer, default=0, server_default=sa.text("0"))
    transcript_hash: Mapped[str | None] = mapped_column(sa.String(64))
    # The client's own chat id (e.g. Open WebUI's X-OpenWebUI-Chat-Id), unique per owner, never global.
    external_id: Mapped[str | None] = mapped_column(sa.String(255))
    # Transcript hash of the exchange this conversation's first record continued but could not find
    # (written later by another worker); the record that has it adopts this conversation.
    parent_hash: Mapped[str | None] = mapped_column(sa.String(64))
    # the team of the request that started it: the team's admins see it
    team_id: Mapped[str | None] = mapped_column(sa.String(64))

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        sa.Index("ix_conversations_owner_updated_at", "owner", "updated_at"),
        sa.Index("ix_conversations_updated_at_id", "updated_at", "id"),
        sa.Index("ix_conversations_transcript_hash", "transcript_hash"),
        sa.Index("ix_conversations_model", "model"),
        sa.Index("ux_conversations_owner_external_id", "owner", "external_id", unique=True),
        sa.Index("ix_conversations_parent_hash", "parent_hash"),
        sa.Index("ix_conversations_team_id_updated_at", "team_id", "updated_at"),
    )


class Message(Base):
    """One message of a conversation, at its position (0-based), with the request that produced it."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("conversations.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(sa.Integer)
    role: Mapped[str] = mapped_column(sa.String(32))
    content: Mapped[Any | None] = mapped_column(JSONType)  # a text string or a list of content parts
    name: Mapped[str | None] = mapped_column(sa.String(255))
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    tool_call_id: Mapped[str | None] = mapped_column(sa.String(255))
    request_id: Mapped[str | None] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")

    __table_args__ = (sa.UniqueConstraint("conversation_id", "position"),)

    def to_dict(self) -> dict[str, Any]:
        """The message in OpenAI chat shape (only the fields that are set)."""
        out: dict[str, Any] = {"role": self.role}
        if self.content is not None:
            out["content"] = self.content
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class ApiKey(Base):
    """An api key: only its sha256 hash is stored, with its limits and restrictions."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default=new_api_key_id)
    name: Mapped[str] = mapped_column(sa.String(255))
    owner: Mapped[str | None] = mapped_column(sa.String(255))
    key_prefix: Mapped[str] = mapped_column(sa.String(32))
    key_hash: Mapped[str] = mapped_column(sa.String(64))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSONType)  # None: every model
    rpm: Mapped[int | None] = mapped_column(sa.Integer)
    tpm: Mapped[int | None] = mapped_column(sa.Integer)
    max_parallel: Mapped[int | None] = mapped_column(sa.Integer)
    daily_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    monthly_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    # a budget for a fixed period [period_start, period_end) (end exclusive): tokens and/or money
    period_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    period_spend: Mapped[float | None] = mapped_column(sa.Float)
    period_start: Mapped[datetime | None] = mapped_column(UTCDateTime())
    period_end: Mapped[datetime | None] = mapped_column(UTCDateTime())
    allowed_ips: Mapped[list[str] | None] = mapped_column(JSONType)  # CIDR strings; None: any address
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    enabled: Mapped[bool] = mapped_column(sa.Boolean, default=True, server_default=sa.true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # the team and user the key belongs to (their limits apply too); no foreign key: checked by the service
    team_id: Mapped[str | None] = mapped_column(sa.String(64))
    user_id: Mapped[str | None] = mapped_column(sa.String(64))
    # a front-end trusted to name its end user per request (TRUSTED_USER_HEADERS)
    trusted_ui: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())

    __table_args__ = (sa.Index("ix_api_keys_key_hash", "key_hash", unique=True),)


class Team(Base):
    """A team (a department, a project): allowed models, rate limits, token and money budgets, and the
    OIDC groups whose members belong to it."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default=new_team_id)
    name: Mapped[str] = mapped_column(sa.String(255))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSONType)  # None: every model
    rpm: Mapped[int | None] = mapped_column(sa.Integer)
    tpm: Mapped[int | None] = mapped_column(sa.Integer)
    max_parallel: Mapped[int | None] = mapped_column(sa.Integer)
    daily_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    monthly_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    daily_spend: Mapped[float | None] = mapped_column(sa.Float)  # in the currency of the models' prices
    monthly_spend: Mapped[float | None] = mapped_column(sa.Float)
    # a budget for a fixed period [period_start, period_end) (end exclusive): tokens and/or money
    period_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    period_spend: Mapped[float | None] = mapped_column(sa.Float)
    period_start: Mapped[datetime | None] = mapped_column(UTCDateTime())
    period_end: Mapped[datetime | None] = mapped_column(UTCDateTime())
    groups: Mapped[list[str] | None] = mapped_column(JSONType)  # OIDC group ids/names mapped to the team
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (sa.Index("ux_teams_name", "name", unique=True),)


class User(Base):
    """A person, identified by the OIDC subject (Entra ID `oid`, else `sub`) within its issuer, with
    optional limits and budgets of their own."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True, default=new_user_id)
    issuer: Mapped[str] = mapped_column(sa.String(512))
    subject: Mapped[str] = mapped_column(sa.String(255))
    email: Mapped[str | None] = mapped_column(sa.String(320))
    name: Mapped[str | None] = mapped_column(sa.String(255))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSONType)
    rpm: Mapped[int | None] = mapped_column(sa.Integer)
    tpm: Mapped[int | None] = mapped_column(sa.Integer)
    max_parallel: Mapped[int | None] = mapped_column(sa.Integer)
    daily_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    monthly_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    daily_spend: Mapped[float | None] = mapped_column(sa.Float)
    monthly_spend: Mapped[float | None] = mapped_column(sa.Float)
    # a budget for a fixed period [period_start, period_end) (end exclusive): tokens and/or money
    period_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    period_spend: Mapped[float | None] = mapped_column(sa.Float)
    period_start: Mapped[datetime | None] = mapped_column(UTCDateTime())
    period_end: Mapped[datetime | None] = mapped_column(UTCDateTime())
    groups: Mapped[list[str] | None] = mapped_column(JSONType)  # the group claims last seen
    enabled: Mapped[bool] = mapped_column(sa.Boolean, default=True, server_default=sa.true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (sa.Index("ux_users_issuer_subject", "issuer", "subject", unique=True),)


class TeamMember(Base):
    """A user's membership of a team, and where it comes from: the user's group claims (kept in sync at
    every sign-in), an admin's assignment (kept until an admin removes it), or both."""

    __tablename__ = "team_members"

    team_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(sa.String(16), default="member", server_default="member")
    via_groups: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    via_admin: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (sa.Index("ix_team_members_user_id", "user_id"),)


class ResponseOwner(Base):
    """Which backend created a stored Responses API response: follow-ups and reads must go there."""

    __tablename__ = "response_owners"

    response_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(255))
    backend: Mapped[str] = mapped_column(sa.String(255))
    key_id: Mapped[str | None] = mapped_column(sa.String(64))
    conversation_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (sa.Index("ix_response_owners_created_at", "created_at"),)


class ConsoleSession(Base):
    """A signed-in console session: only the sha256 of the cookie's token is stored, never the token."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)  # sha256 hex of the cookie token
    subject: Mapped[str] = mapped_column(sa.String(255))  # "admin", or a signed-in user's subject
    method: Mapped[str] = mapped_column(sa.String(32))  # admin_key | local | oidc | ...
    name: Mapped[str | None] = mapped_column(sa.String(255))  # shown in the page header
    # a fingerprint of the credential it was opened with (the admin key): changing it ends the session
    credential: Mapped[str | None] = mapped_column(sa.String(64))
    client_ip: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        sa.Index("ix_console_sessions_expires_at", "expires_at"),
        sa.Index("ix_console_sessions_subject", "subject"),
    )


# ---------------------------------------------------------------------------------------------------------
# Rollups: totals per time bucket that the recorder keeps in the same transaction as the request_log rows it
# inserts (llm_backend.recording.rollups); what usage reports and the console's overview read. Dimensions
# are NOT NULL, '' standing for "none" (a unique key over NULLs would not merge them on every backend).

#: Upper bounds (ms) of the latency and time-to-first-token histogram buckets; one more bucket above the
#: last bound. Changing them needs a migration (each bucket is a column) and a rebuild of the rollups.
LATENCY_BOUNDS_MS: tuple[int, ...] = (
    50, 100, 200, 350, 500, 750, 1000, 1500, 2000, 3000, 5000, 8000, 15000, 30000, 60000,
)  # fmt: skip
HISTOGRAM_BUCKETS = len(LATENCY_BOUNDS_MS) + 1
LATENCY_COLUMNS = tuple(f"latency_b{i:02d}" for i in range(HISTOGRAM_BUCKETS))
TTFT_COLUMNS = tuple(f"ttft_b{i:02d}" for i in range(HISTOGRAM_BUCKETS))

#: Dimensions of usage_hourly / usage_daily (the unique key with `bucket`).
ROLLUP_DIMENSIONS = ("model", "key_id", "backend", "operation", "outcome", "error_type", "team_id", "user_id")
#: Dimensions of usage_callers_daily: who called (end user and address within a key).
CALLER_DIMENSIONS = ("key_id", "user", "client_ip")
#: Summed columns of usage_hourly / usage_daily, in order.
ROLLUP_SUMS = (
    "requests",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "priced",  # requests that had a cost (prices configured for their model)
    "cost",
    "latency_ms_sum",
    "ttft_count",  # requests that had a time to first token (streams)
    "ttft_ms_sum",
    *LATENCY_COLUMNS,
    *TTFT_COLUMNS,
)
#: Summed columns of usage_callers_daily.
CALLER_SUMS = (
    "requests",
    "errors",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "priced",
    "cost",
)
_FLOAT_SUMS = frozenset({"cost", "latency_ms_sum", "ttft_ms_sum"})
_DIMENSION_LENGTHS = {
    "model": 255,
    "key_id": 64,
    "backend": 255,
    "operation": 32,
    "outcome": 32,
    "error_type": 255,
    "user": 255,
    "client_ip": 64,
    "team_id": 64,
    "user_id": 64,
    "facet": 32,
    "value": 255,
}


def _sum_column(name: str) -> sa.Column[Any]:
    kind: Any = sa.Float() if name in _FLOAT_SUMS else sa.BigInteger()
    return sa.Column(name, kind, nullable=False, server_default=sa.text("0"))


def _rollup_table(name: str, dimensions: tuple[str, ...], sums: tuple[str, ...]) -> sa.Table:
    """A rollup table: its primary key is the bucket start and the dimensions (what upserts conflict on,
    and what a range of buckets is read by)."""
    return sa.Table(
        name,
        Base.metadata,
        sa.Column("bucket", UTCDateTime(), primary_key=True),
        *(sa.Column(d, sa.String(_DIMENSION_LENGTHS[d]), primary_key=True) for d in dimensions),
        *(_sum_column(s) for s in sums),
    )


USAGE_HOURLY = _rollup_table("usage_hourly", ROLLUP_DIMENSIONS, ROLLUP_SUMS)
USAGE_DAILY = _rollup_table("usage_daily", ROLLUP_DIMENSIONS, ROLLUP_SUMS)
USAGE_CALLERS_DAILY = _rollup_table("usage_callers_daily", CALLER_DIMENSIONS, CALLER_SUMS)

#: Facets of usage_facets_hourly / usage_facets_daily, narrow rollups of the same requests that the
#: unfiltered overview reads (a few rows per bucket instead of one per combination of all dimensions):
#: facet "" (value '') holds every request by outcome and error type (the time series and totals),
#: facet "model" / "key_id" / "backend" the same split by that dimension's value (the breakdowns).
FACETS = ("", "model", "key_id", "backend")
#: Dimensions of the facet rollups (the unique key with `bucket`).
FACET_DIMENSIONS = ("facet", "value", "outcome", "error_type")
USAGE_FACETS_HOURLY = _rollup_table("usage_facets_hourly", FACET_DIMENSIONS, ROLLUP_SUMS)
USAGE_FACETS_DAILY = _rollup_table("usage_facets_daily", FACET_DIMENSIONS, ROLLUP_SUMS)


# ---------------------------------------------------------------------------------------------------------
# Every text set on a model is made storable (U+0000 → U+FFFD, see llm_backend.db.storable): PostgreSQL
# refuses NUL in text and JSONB, so a NUL in a key's name, a title, a system prompt or a message would
# otherwise fail the write (and SQLite would store what PostgreSQL cannot). Writes through Core (the
# recorder's batch inserts) are made storable before they are built, in llm_backend.recording.


def _storable_on_set(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
    return storable(value)


def _listen_to_texts(*models: type[Base]) -> None:
    for model in models:
        for attr in sa.inspect(model).column_attrs:
            if isinstance(attr.columns[0].type, sa.String | sa.JSON):
                sa.event.listen(getattr(model, attr.key), "set", _storable_on_set, retval=True)


_listen_to_texts(
    RequestLog, Conversation, Message, ApiKey, ResponseOwner, ConsoleSession, Team, User, TeamMember
)
