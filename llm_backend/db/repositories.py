"""Repositories over a `Session`: request log (idempotent inserts, usage), conversations, api keys."""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from llm_backend.db.base import utcnow
from llm_backend.db.ids import new_uuid7
from llm_backend.db.models import ApiKey, Conversation, Message, RequestLog, Team, TeamMember, User
from llm_backend.recording.threading import normalize_message, transcript_hash

logger = logging.getLogger(__name__)

_REQUEST_LOG_COLUMNS = frozenset(c.name for c in RequestLog.__table__.columns)
# `user` is what the client wrote in the body's user field; `user_id` and `team` the user and team the
# request counted for.
USAGE_GROUPS = ("key", "model", "day", "user", "backend", "user_id", "team")


class InvalidCursor(ValueError):
    """A pagination cursor that this code did not produce."""


# ---------------------------------------------------------------------------------------------------------
# Request log


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals of one group of requests; group fields not asked for are None."""

    key_id: str | None
    model: str | None
    day: str | None  # YYYY-MM-DD (UTC)
    user: str | None
    backend: str | None
    requests: int
    errors: int
    estimated: int  # requests whose tokens were estimated
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    user_id: str | None = None
    team_id: str | None = None


def _request_filters(stmt: Any, since: datetime, until: datetime, **equal: str | None) -> Any:
    """`stmt` limited to rows created in [since, until) whose columns equal the given values (None: any)."""
    stmt = stmt.where(RequestLog.created_at >= since, RequestLog.created_at < until)
    for column, value in equal.items():
        if value is not None:
            stmt = stmt.where(getattr(RequestLog, column) == value)
    return stmt


class RequestLogRepository:
    """The request log: one row per request id, inserted idempotently, summarised for usage reports."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def existing_ids(self, request_ids: Iterable[str]) -> set[str]:
        """Which of `request_ids` already have a row."""
        ids = list(dict.fromkeys(request_ids))
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            stmt = sa.select(RequestLog.request_id).where(RequestLog.request_id.in_(chunk))
            found.update(self.session.scalars(stmt))
        return found

    def insert_ignore(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows (column name → value); rows whose request_id exists already are left as they are."""
        if not rows:
            return
        unknown = set().union(*(r.keys() for r in rows)) - _REQUEST_LOG_COLUMNS
        if unknown:
            raise ValueError(f"unknown request_log columns: {sorted(unknown)}")
        # Deduplicate within the batch (first one wins), like the database does across batches.
        unique = list({r["request_id"]: r for r in reversed(rows)}.values())[::-1]
        dialect = self.session.get_bind().dialect.name
        table: Any = RequestLog.__table__
        if dialect == "postgresql":
            pg_stmt = postgresql.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
            self.session.execute(pg_stmt, unique)
        elif dialect == "sqlite":
            lite_stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=["request_id"])
            self.session.execute(lite_stmt, unique)
        else:  # portable fallback: skip what exists (not safe against concurrent writers of the same ids)
            existing = self.existing_ids(r["request_id"] for r in unique)
            new_rows = [r for r in unique if r["request_id"] not in existing]
            if new_rows:
                self.session.execute(sa.insert(table), new_rows)

    def get(self, request_id: str) -> RequestLog | None:
        return self.session.get(RequestLog, request_id)

    def count(self) -> int:
        return int(self.session.scalar(sa.select(sa.func.count()).select_from(RequestLog)) or 0)

    def search(
        self,
        *,
        since: datetime,
        until: datetime,
        client_request_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[RequestLog]:
        """Rows over [since, until), newest first, filtered by the client's request id, key or model."""
        stmt = _request_filters(
            sa.select(RequestLog),
            since,
            until,
            key_id=key_id,
            model=model,
            client_request_id=client_request_id,
        )
        stmt = stmt.order_by(RequestLog.created_at.desc(), RequestLog.request_id.desc()).limit(limit)
        return builtins.list(self.session.scalars(stmt))

    def _day_expr(self) -> sa.ColumnElement[str]:
        if self.session.get_bind().dialect.name == "postgresql":
            return sa.func.to_char(sa.func.timezone("UTC", RequestLog.created_at), "YYYY-MM-DD")
        # SQLite stores UTC text "YYYY-MM-DD HH:MM:SS.ffffff"
        return sa.func.substr(RequestLog.created_at, 1, 10)

    def usage_summary(
        self,
        *,
        since: datetime,
        until: datetime,
        group_by: Sequence[str] = ("key", "model", "day"),
        key_id: str | None = None,
        model: str | None = None,
        client_request_id: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
    ) -> list[UsageRow]:
        """Token and request totals over [since, until), grouped by any of key/model/day/user/backend."""
        bad = set(group_by) - set(USAGE_GROUPS)
        if bad:
            raise ValueError(f"cannot group usage by {sorted(bad)}; choose from {USAGE_GROUPS}")
        group_cols: dict[str, Any] = {
            "key": RequestLog.key_id,
            "model": RequestLog.model,
            "day": self._day_expr(),
            "user": RequestLog.user,
            "backend": RequestLog.backend,
            "user_id": RequestLog.user_id,
            "team": RequestLog.team_id,
        }
        keys = [g for g in USAGE_GROUPS if g in group_by]
        labelled = [group_cols[g].label(g) for g in keys]

        def total(col: Any) -> sa.ColumnElement[int]:
            return sa.func.coalesce(sa.func.sum(col), 0)

        stmt = sa.select(
            *labelled,
            sa.func.count().label("requests"),
            total(sa.case((RequestLog.outcome != "ok", 1), else_=0)).label("errors"),
            total(sa.case((RequestLog.tokens_estimated, 1), else_=0)).label("estimated"),
            total(RequestLog.prompt_tokens).label("prompt_tokens"),
            total(RequestLog.completion_tokens).label("completion_tokens"),
            total(RequestLog.total_tokens).label("total_tokens"),
            total(RequestLog.cached_tokens).label("cached_tokens"),
            total(RequestLog.reasoning_tokens).label("reasoning_tokens"),
        )
        stmt = _request_filters(
            stmt,
            since,
            until,
            key_id=key_id,
            model=model,
            client_request_id=client_request_id,
            user_id=user_id,
            team_id=team_id,
        )
        if keys:
            stmt = stmt.group_by(*[group_cols[g] for g in keys]).order_by(*[group_cols[g] for g in keys])
        rows = []
        for row in self.session.execute(stmt).mappings():
            rows.append(
                UsageRow(
                    key_id=row.get("key"),
                    model=row.get("model"),
                    day=row.get("day"),
                    user=row.get("user"),
                    backend=row.get("backend"),
                    user_id=row.get("user_id"),
                    team_id=row.get("team"),
                    requests=int(row["requests"]),
                    errors=int(row["errors"]),
                    estimated=int(row["estimated"]),
                    prompt_tokens=int(row["prompt_tokens"]),
                    completion_tokens=int(row["completion_tokens"]),
                    total_tokens=int(row["total_tokens"]),
                    cached_tokens=int(row["cached_tokens"]),
                    reasoning_tokens=int(row["reasoning_tokens"]),
                )
            )
        return rows


# ---------------------------------------------------------------------------------------------------------
# Conversations


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """One page of conversations, newest update first; `next_cursor` is None on the last page."""

    items: list[Conversation]
    next_cursor: str | None


def encode_cursor(updated_at: datetime, conversation_id: str) -> str:
    raw = json.dumps([updated_at.isoformat(), conversation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, conversation_id = json.loads(raw)
        when = datetime.fromisoformat(stamp)
        if not isinstance(conversation_id, str) or when.tzinfo is None:
            raise ValueError("bad cursor fields")
        return when, conversation_id
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidCursor("invalid pagination cursor") from exc


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ConversationRepository:
    """Conversations and their messages: CRUD, cursor pagination, appends, lookup by transcript hash.

    `owner` arguments of get/list/rename/delete filter when given (None: no filter, every caller sees all).
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(
        self,
        *,
        title: str | None = None,
        owner: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        conversation_id: str | None = None,
        created_at: datetime | None = None,
        external_id: str | None = None,
        parent_hash: str | None = None,
        team_id: str | None = None,
    ) -> Conversation:
        when = _aware(created_at) if created_at else utcnow()
        conv = Conversation(
            id=conversation_id or new_uuid7(),
            title=title,
            owner=owner,
            team_id=team_id,
            model=model,
            system_prompt=system_prompt,
            external_id=external_id,
            parent_hash=parent_hash,
            created_at=when,
            updated_at=when,
            prompt_tokens=0,
            completion_tokens=0,
            total_tokens=0,
            message_count=0,
            transcript_hash=None,
        )
        self.session.add(conv)
        self.session.flush()
        return conv

    def _owned(self, stmt: Any, owner: str | None, teams: Sequence[str] = ()) -> Any:
        """`stmt` confined to `owner`'s conversations and those of `teams` (None owner: no confinement)."""
        if owner is None:
            return stmt
        if teams:
            return stmt.where(sa.or_(Conversation.owner == owner, Conversation.team_id.in_(list(teams))))
        return stmt.where(Conversation.owner == owner)

    def get(
        self,
        conversation_id: str,
        *,
        owner: str | None = None,
        with_messages: bool = True,
        teams: Sequence[str] = (),
    ) -> Conversation | None:
        stmt = self._owned(sa.select(Conversation).where(Conversation.id == conversation_id), owner, teams)
        if with_messages:
            stmt = stmt.options(selectinload(Conversation.messages))
        return self.session.scalars(stmt).first()

    def get_by_external_id(self, external_id: str, *, owner: str | None) -> Conversation | None:
        """The conversation that `owner` (None: no owner) keys by the client's chat id `external_id`."""
        owner_clause = Conversation.owner.is_(None) if owner is None else Conversation.owner == owner
        stmt = (
            sa.select(Conversation)
            .where(Conversation.external_id == external_id, owner_clause)
            .options(selectinload(Conversation.messages))
        )
        return self.session.scalars(stmt).first()

    def messages(self, conversation_id: str) -> list[Message]:
        stmt = sa.select(Message).where(Message.conversation_id == conversation_id).order_by(Message.position)
        return list(self.session.scalars(stmt))

    def list(
        self,
        *,
        owner: str | None = None,
        model: str | Sequence[str] | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        q: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        teams: Sequence[str] = (),
    ) -> ConversationPage:
        """Conversations by (updated_at, id) descending; `q` searches titles case-insensitively.

        `model` is a name or several (a model and its aliases): a conversation recorded under any matches.
        """
        limit = max(1, min(int(limit), 1000))
        stmt = self._owned(sa.select(Conversation), owner, teams)
        if isinstance(model, str):
            stmt = stmt.where(Conversation.model == model)
        elif model is not None:
            stmt = stmt.where(Conversation.model.in_(list(model)))
        if created_from is not None:
            stmt = stmt.where(Conversation.created_at >= created_from)
        if created_to is not None:
            stmt = stmt.where(Conversation.created_at < created_to)
        if q:
            pattern = f"%{_escape_like(q.lower())}%"
            stmt = stmt.where(sa.func.lower(Conversation.title).like(pattern, escape="\\"))
        if cursor:
            when, last_id = decode_cursor(cursor)
            stmt = stmt.where(
                sa.or_(
                    Conversation.updated_at < when,
                    sa.and_(Conversation.updated_at == when, Conversation.id < last_id),
                )
            )
        stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit + 1)
        items = list(self.session.scalars(stmt))
        next_cursor = None
        if len(items) > limit:
            items = items[:limit]
            next_cursor = encode_cursor(items[-1].updated_at, items[-1].id)
        return ConversationPage(items=items, next_cursor=next_cursor)

    def rename(
        self, conversation_id: str, title: str, *, owner: str | None = None, teams: Sequence[str] = ()
    ) -> Conversation | None:
        conv = self.get(conversation_id, owner=owner, with_messages=False, teams=teams)
        if conv is None:
            return None
        conv.title = title
        conv.updated_at = utcnow()
        self.session.flush()
        return conv

    def delete(self, conversation_id: str, *, owner: str | None = None, teams: Sequence[str] = ()) -> bool:
        """Delete a conversation and (by cascade) its messages; False when there was none."""
        stmt = self._owned(sa.delete(Conversation).where(Conversation.id == conversation_id), owner, teams)
        result = self.session.execute(stmt.execution_options(synchronize_session=False))
        self.session.expire_all()
        return bool(getattr(result, "rowcount", 0))

    def append_messages(
        self,
        conversation: Conversation | str,
        messages: Sequence[Mapping[str, Any]],
        *,
        request_id: str | None = None,
        created_at: datetime | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        total_tokens: int = 0,
    ) -> builtins.list[Message]:
        """Append normalised messages after the last; update totals, count, updated_at, transcript hash."""
        conv = conversation if isinstance(conversation, Conversation) else self.get(conversation)
        if conv is None:
            raise LookupError(f"no conversation {conversation!r}")
        when = _aware(created_at) if created_at else utcnow()
        existing = list(conv.messages)  # loads them unless loaded; keeps the session's view current
        position = existing[-1].position + 1 if existing else 0
        added: list[Message] = []
        for raw in messages:
            msg = normalize_message(dict(raw))
            if "role" not in msg:
                raise ValueError("a message needs a role")
            added.append(
                Message(
                    position=position,
                    role=str(msg["role"]),
                    content=msg.get("content"),
                    name=msg.get("name"),
                    tool_calls=msg.get("tool_calls"),
                    tool_call_id=msg.get("tool_call_id"),
                    request_id=request_id,
                    created_at=when,
                )
            )
            position += 1
        conv.messages.extend(added)
        conv.prompt_tokens = (conv.prompt_tokens or 0) + prompt_tokens
        conv.completion_tokens = (conv.completion_tokens or 0) + completion_tokens
        conv.total_tokens = (conv.total_tokens or 0) + total_tokens
        conv.message_count = len(existing) + len(added)
        conv.updated_at = max(conv.updated_at, when) if conv.updated_at else when
        conv.transcript_hash = transcript_hash([m.to_dict() for m in [*existing, *added]])
        self.session.flush()
        return added

    def find_by_transcript_hash(
        self, hashes: str | Sequence[str], *, owner: str | None, unkeyed: bool = False
    ) -> Conversation | None:
        """The most recently updated conversation of `owner` (None matches no owner) with one of `hashes`.

        `unkeyed` considers only conversations without a client chat id (external_id).
        """
        wanted = [hashes] if isinstance(hashes, str) else list(hashes)
        if not wanted:
            return None
        owner_clause = Conversation.owner.is_(None) if owner is None else Conversation.owner == owner
        stmt = sa.select(Conversation).where(Conversation.transcript_hash.in_(wanted), owner_clause)
        if unkeyed:
            stmt = stmt.where(Conversation.external_id.is_(None))
        stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(1)
        return self.session.scalars(stmt).first()


# ---------------------------------------------------------------------------------------------------------
# API keys


def hash_api_key(secret: str) -> str:
    """The stored form of an api key: sha256 hex of the secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


_API_KEY_UPDATABLE = frozenset(
    {
        "name",
        "owner",
        "allowed_models",
        "rpm",
        "tpm",
        "max_parallel",
        "daily_tokens",
        "monthly_tokens",
        "allowed_ips",
        "expires_at",
        "enabled",
        "team_id",
        "user_id",
        "trusted_ui",
    }
)


class ApiKeyRepository:
    """Api keys, looked up by id or by the hash of the presented secret."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(
        self,
        *,
        name: str,
        key_hash: str,
        key_prefix: str,
        owner: str | None = None,
        key_id: str | None = None,
        allowed_models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        daily_tokens: int | None = None,
        monthly_tokens: int | None = None,
        allowed_ips: list[str] | None = None,
        expires_at: datetime | None = None,
        enabled: bool = True,
        team_id: str | None = None,
        user_id: str | None = None,
        trusted_ui: bool = False,
    ) -> ApiKey:
        key = ApiKey(
            name=name,
            key_hash=key_hash,
            key_prefix=key_prefix,
            owner=owner,
            allowed_models=allowed_models,
            rpm=rpm,
            tpm=tpm,
            max_parallel=max_parallel,
            daily_tokens=daily_tokens,
            monthly_tokens=monthly_tokens,
            allowed_ips=allowed_ips,
            expires_at=expires_at,
            enabled=enabled,
            team_id=team_id,
            user_id=user_id,
            trusted_ui=trusted_ui,
            created_at=utcnow(),
        )
        if key_id:
            key.id = key_id
        self.session.add(key)
        self.session.flush()
        return key

    def get(self, key_id: str) -> ApiKey | None:
        return self.session.get(ApiKey, key_id)

    def get_by_hash(self, key_hash: str) -> ApiKey | None:
        return self.session.scalars(sa.select(ApiKey).where(ApiKey.key_hash == key_hash)).first()

    def list(
        self, *, owner: str | None = None, enabled: bool | None = None, team_id: str | None = None
    ) -> list[ApiKey]:
        stmt = sa.select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if owner is not None:
            stmt = stmt.where(ApiKey.owner == owner)
        if team_id is not None:
            stmt = stmt.where(ApiKey.team_id == team_id)
        if enabled is not None:
            stmt = stmt.where(ApiKey.enabled.is_(enabled))
        return list(self.session.scalars(stmt))

    def update(self, key_id: str, **fields: Any) -> ApiKey | None:
        """Set the given fields (name, owner, limits, allowed_*, expires_at, enabled); None if no such key."""
        bad = set(fields) - _API_KEY_UPDATABLE
        if bad:
            raise ValueError(f"cannot update api key fields {sorted(bad)}")
        key = self.get(key_id)
        if key is None:
            return None
        for name, value in fields.items():
            setattr(key, name, value)
        self.session.flush()
        return key

    def delete(self, key_id: str) -> bool:
        result = self.session.execute(
            sa.delete(ApiKey).where(ApiKey.id == key_id).execution_options(synchronize_session=False)
        )
        self.session.expire_all()
        return bool(getattr(result, "rowcount", 0))

    def touch(self, key_id: str, when: datetime | None = None) -> None:
        """Record a use of the key (one UPDATE, no read)."""
        self.session.execute(
            sa.update(ApiKey)
            .where(ApiKey.id == key_id)
            .values(last_used_at=when or utcnow())
            .execution_options(synchronize_session=False)
        )


# ---------------------------------------------------------------------------------------------------------
# Teams and users

ORG_LIMIT_COLUMNS = (
    "allowed_models",
    "rpm",
    "tpm",
    "max_parallel",
    "daily_tokens",
    "monthly_tokens",
    "daily_spend",
    "monthly_spend",
)
_TEAM_UPDATABLE = frozenset({"name", "groups", *ORG_LIMIT_COLUMNS})
_USER_UPDATABLE = frozenset({"email", "name", "enabled", *ORG_LIMIT_COLUMNS})


class TeamRepository:
    """Teams, by id or by name, and the teams that OIDC groups map to."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, *, name: str, **fields: Any) -> Team:
        bad = set(fields) - _TEAM_UPDATABLE
        if bad:
            raise ValueError(f"unknown team fields {sorted(bad)}")
        now = utcnow()
        team = Team(name=name, created_at=now, updated_at=now, **fields)
        self.session.add(team)
        self.session.flush()
        return team

    def get(self, team_id: str) -> Team | None:
        return self.session.get(Team, team_id)

    def get_by_name(self, name: str) -> Team | None:
        return self.session.scalars(sa.select(Team).where(Team.name == name)).first()

    def list(self) -> builtins.list[Team]:
        return builtins.list(self.session.scalars(sa.select(Team).order_by(Team.name, Team.id)))

    def with_groups(self) -> builtins.list[Team]:
        """Teams mapped to at least one OIDC group."""
        return [t for t in self.list() if t.groups]

    def update(self, team_id: str, **fields: Any) -> Team | None:
        bad = set(fields) - _TEAM_UPDATABLE
        if bad:
            raise ValueError(f"cannot update team fields {sorted(bad)}")
        team = self.get(team_id)
        if team is None:
            return None
        for name, value in fields.items():
            setattr(team, name, value)
        team.updated_at = utcnow()
        self.session.flush()
        return team

    def delete(self, team_id: str) -> bool:
        self.session.execute(sa.delete(TeamMember).where(TeamMember.team_id == team_id))
        result = self.session.execute(
            sa.delete(Team).where(Team.id == team_id).execution_options(synchronize_session=False)
        )
        self.session.expire_all()
        return bool(getattr(result, "rowcount", 0))

    def members(self, team_id: str) -> builtins.list[tuple[TeamMember, User]]:
        stmt = (
            sa.select(TeamMember, User)
            .join(User, User.id == TeamMember.user_id)
            .where(TeamMember.team_id == team_id)
            .order_by(User.email, User.id)
        )
        return [(m, u) for m, u in self.session.execute(stmt).tuples()]


class UserRepository:
    """Users by id or by (issuer, subject), and their team memberships."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, user_id: str) -> User | None:
        return self.session.get(User, user_id)

    def get_by_subject(self, issuer: str, subject: str) -> User | None:
        stmt = sa.select(User).where(User.issuer == issuer, User.subject == subject)
        return self.session.scalars(stmt).first()

    def create(self, *, issuer: str, subject: str, **fields: Any) -> User:
        user = User(issuer=issuer, subject=subject, created_at=utcnow(), **fields)
        self.session.add(user)
        self.session.flush()
        return user

    def list(
        self, *, team_id: str | None = None, q: str | None = None, limit: int = 1000
    ) -> builtins.list[User]:
        stmt = sa.select(User)
        if team_id is not None:
            stmt = stmt.join(TeamMember, TeamMember.user_id == User.id).where(TeamMember.team_id == team_id)
        if q:
            pattern = f"%{_escape_like(q.lower())}%"
            stmt = stmt.where(
                sa.or_(
                    sa.func.lower(User.email).like(pattern, escape="\\"),
                    sa.func.lower(User.name).like(pattern, escape="\\"),
                    User.subject == q,
                )
            )
        stmt = stmt.order_by(User.created_at, User.id).limit(max(1, min(int(limit), 10_000)))
        return builtins.list(self.session.scalars(stmt))

    def update(self, user_id: str, **fields: Any) -> User | None:
        bad = set(fields) - _USER_UPDATABLE - {"groups", "last_seen_at"}
        if bad:
            raise ValueError(f"cannot update user fields {sorted(bad)}")
        user = self.get(user_id)
        if user is None:
            return None
        for name, value in fields.items():
            setattr(user, name, value)
        self.session.flush()
        return user

    def memberships(self, user_id: str) -> builtins.list[tuple[TeamMember, Team]]:
        """The user's memberships with their teams, by team name."""
        stmt = (
            sa.select(TeamMember, Team)
            .join(Team, Team.id == TeamMember.team_id)
            .where(TeamMember.user_id == user_id)
            .order_by(Team.name, Team.id)
        )
        return [(m, t) for m, t in self.session.execute(stmt).tuples()]

    def set_membership(
        self,
        user_id: str,
        team_id: str,
        *,
        via_groups: bool | None = None,
        via_admin: bool | None = None,
        role: str | None = None,
    ) -> TeamMember | None:
        """Set where a membership comes from (None: unchanged); a membership from nowhere is removed."""
        member = self.session.get(TeamMember, (team_id, user_id))
        if member is None:
            if not via_groups and not via_admin:
                return None
            member = TeamMember(
                team_id=team_id,
                user_id=user_id,
                role=role or "member",
                via_groups=bool(via_groups),
                via_admin=bool(via_admin),
                created_at=utcnow(),
            )
            self.session.add(member)
            self.session.flush()
            return member
        if via_groups is not None:
            member.via_groups = via_groups
        if via_admin is not None:
            member.via_admin = via_admin
        if role is not None:
            member.role = role
        if not member.via_groups and not member.via_admin:
            self.session.delete(member)
            self.session.flush()
            return None
        self.session.flush()
        return member


# ---------------------------------------------------------------------------------------------------------
# Budget windows


def key_token_totals(
    session: Session, key_id: str, day_start: datetime, month_start: datetime
) -> tuple[int, int]:
    """Tokens a key used since `day_start` and since `month_start` (both UTC, one indexed range scan from the
    earlier of the two): what the limiter's budget counters are re-seeded from after they were lost."""
    since = min(day_start, month_start)
    total = RequestLog.total_tokens
    stmt = sa.select(
        sa.func.coalesce(sa.func.sum(sa.case((RequestLog.created_at >= day_start, total), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((RequestLog.created_at >= month_start, total), else_=0)), 0),
    ).where(RequestLog.key_id == key_id, RequestLog.created_at >= since)
    day, month = session.execute(stmt).one()
    return int(day or 0), int(month or 0)


#: The request log column each limiter level's usage is summed by.
LEVEL_COLUMNS = {"key": "key_id", "user": "user_id", "team": "team_id"}


def level_totals(
    session: Session, level: str, level_id: str, day_start: datetime, month_start: datetime
) -> tuple[int, int, float, float]:
    """Tokens and cost of one limiter level (a key, a user or a team) since `day_start` and `month_start`:
    what its budget counters are re-seeded from (cost 0 where the log holds none)."""
    column = getattr(RequestLog, LEVEL_COLUMNS[level])
    since = min(day_start, month_start)
    total = RequestLog.total_tokens
    cost = getattr(RequestLog, "cost", None)

    def summed(value: Any, start: datetime) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((RequestLog.created_at >= start, value), else_=0)), 0)

    cols = [summed(total, day_start), summed(total, month_start)]
    if cost is not None:
        cols += [summed(cost, day_start), summed(cost, month_start)]
    row = session.execute(sa.select(*cols).where(column == level_id, RequestLog.created_at >= since)).one()
    day_cost = float(row[2] or 0.0) if cost is not None else 0.0
    month_cost = float(row[3] or 0.0) if cost is not None else 0.0
    return int(row[0] or 0), int(row[1] or 0), day_cost, month_cost
