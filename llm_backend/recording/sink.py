"""Writing recorded requests to the database: row mapping, conversation threading, batch transactions."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from llm_backend.db.ids import new_uuid7
from llm_backend.db.models import Conversation, Message, RequestLog
from llm_backend.db.repositories import ConversationRepository, RequestLogRepository
from llm_backend.db.session import SQLITE_BEGIN_IMMEDIATE
from llm_backend.recording.records import RequestRecord, Usage
from llm_backend.recording.threading import (
    continuation_prefix_lengths,
    normalize_message,
    title_from_messages,
    transcript_hash,
)

logger = logging.getLogger(__name__)

_STRING_LIMITS: dict[str, int] = {
    c.name: c.type.length
    for c in RequestLog.__table__.columns
    if isinstance(c.type, sa.String) and c.type.length is not None
}
_CONVERSATION_ID_MAX = 64
_MESSAGES: sa.Table = Message.__table__  # type: ignore[assignment]
_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(RequestRecord))
_USAGE_FIELDS = frozenset(f.name for f in dataclasses.fields(Usage))


# ---------------------------------------------------------------------------------------------------------
# Records as JSON lines (the spill file) and as request_log rows


def record_to_json(record: RequestRecord) -> str:
    """One line of JSON (no newline) that `record_from_json` turns back into the record."""
    data = dataclasses.asdict(record)
    data["created_at"] = record.created_at.isoformat()
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)


def record_from_json(line: str | bytes) -> RequestRecord:
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("a spilled record must be a JSON object")
    data = {k: v for k, v in data.items() if k in _RECORD_FIELDS}
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    usage = data.get("usage") or {}
    data["usage"] = Usage(**{k: v for k, v in usage.items() if k in _USAGE_FIELDS})
    return RequestRecord(**data)


def _clip(column: str, value: Any) -> Any:
    limit = _STRING_LIMITS.get(column)
    if limit is not None and isinstance(value, str) and len(value) > limit:
        return value[:limit]
    return value


def record_to_row(record: RequestRecord, conversation_id: str | None) -> dict[str, Any]:
    """The request_log row of a record (usage flattened; over-long strings clipped to their column)."""
    usage = record.usage
    row: dict[str, Any] = {
        "request_id": record.request_id,
        "created_at": record.created_at,
        "route": record.route,
        "operation": record.operation,
        "status_code": record.status_code,
        "outcome": record.outcome,
        "error_type": record.error_type,
        "stream": record.stream,
        "model_requested": record.model_requested,
        "model": record.model,
        "provider": record.provider,
        "backend": record.backend,
        "deployment": record.deployment,
        "attempts": record.attempts,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "tokens_estimated": usage.estimated,
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
        "key_id": record.key_id,
        "user": record.user,
        "client_ip": record.client_ip,
        "conversation_id": conversation_id,
    }
    return {k: _clip(k, v) for k, v in row.items()}


# ---------------------------------------------------------------------------------------------------------
# Errors


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed later (database down, locked, schema not migrated yet).

    Integrity and data errors, and errors of our own code, are about the records, not the database.
    """
    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return False
    return isinstance(exc, sa_exc.DBAPIError | sa_exc.DisconnectionError | sa_exc.TimeoutError | OSError)


# ---------------------------------------------------------------------------------------------------------
# Conversation threading


def thread_record(repo: ConversationRepository, record: RequestRecord) -> str | None:
    """Store the exchange of a chat record in a conversation; returns the conversation id.

    An explicit conversation id (X-Conversation-Id) wins: the messages past the stored ones are appended
    when the stored transcript is a prefix of the request, otherwise only the final user message. Without
    one, the request continues the owner's conversation whose transcript equals the messages before its
    final user turn; otherwise a new conversation holds all messages. The reply is appended in each case.
    """
    if not record.request_messages or record.response_message is None:
        return record.conversation_id
    messages = [normalize_message(m) for m in record.request_messages]
    reply = normalize_message(record.response_message)
    reply.setdefault("role", "assistant")
    usage = record.usage
    finished = record.created_at + timedelta(milliseconds=max(record.latency_ms, 0.0))
    append_kwargs: dict[str, Any] = {
        "request_id": record.request_id,
        "created_at": finished,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    owner = record.key_id
    model = record.model or record.model_requested

    explicit = record.conversation_id
    if explicit and len(explicit) <= _CONVERSATION_ID_MAX:
        conv = repo.get(explicit, with_messages=True)
        if conv is None:
            conv = repo.create(
                conversation_id=explicit,
                title=title_from_messages(messages),
                owner=owner,
                model=model,
                created_at=record.created_at,
            )
            repo.append_messages(conv, [*messages, reply], **append_kwargs)
            return conv.id
        if conv.owner is None or conv.owner == owner:
            stored = len(conv.messages)
            if record.continues:
                new = messages
            elif stored == 0 or (
                len(messages) > stored and transcript_hash(messages[:stored]) == conv.transcript_hash
            ):
                new = messages[stored:]
            else:
                users = [m for m in messages if m.get("role") == "user"]
                new = users[-1:]
            repo.append_messages(conv, [*new, reply], **append_kwargs)
            return conv.id
        logger.warning(
            "request %s names conversation %s of another owner; threading it on its own",
            record.request_id,
            explicit,
        )
    elif explicit:
        logger.warning("request %s: conversation id too long, ignored", record.request_id)

    lengths = continuation_prefix_lengths(messages)
    hashes = {transcript_hash(messages[:n]): n for n in lengths}
    match: Conversation | None = repo.find_by_transcript_hash(list(hashes), owner=owner) if hashes else None
    if match is not None and match.transcript_hash in hashes:
        new = messages[hashes[match.transcript_hash] :]
        repo.append_messages(match, [*new, reply], **append_kwargs)
        return match.id
    conv = repo.create(
        title=title_from_messages(messages), owner=owner, model=model, created_at=record.created_at
    )
    repo.append_messages(conv, [*messages, reply], **append_kwargs)
    return conv.id


def _thread_in_savepoint(session: Session, record: RequestRecord) -> str | None:
    """Thread one record in a savepoint; a data problem leaves the conversation out, never the usage row."""
    fallback = record.conversation_id
    if fallback and len(fallback) > _CONVERSATION_ID_MAX:
        fallback = None
    for attempt in (1, 2):
        try:
            with session.begin_nested():
                return thread_record(ConversationRepository(session), record)
        except Exception as exc:
            if is_transient(exc):
                raise
            # A concurrent writer (another worker) may have taken the same position: look again once.
            retry = attempt == 1 and isinstance(exc, sa_exc.IntegrityError)
            logger.warning(
                "conversation threading of request %s failed (%s: %s)%s",
                record.request_id,
                type(exc).__name__,
                exc,
                "; retrying" if retry else "; recording usage only",
            )
            if not retry:
                break
    return fallback


# ---------------------------------------------------------------------------------------------------------
# Batches


@dataclasses.dataclass(slots=True)
class _Conv:
    """A conversation as the batch sees it: its state before the batch plus what the batch added."""

    id: str
    owner: str | None
    count: int
    transcript_hash: str | None
    new: bool = False
    title: str | None = None
    model: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    added: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _in_chunks(items: Sequence[Any], size: int = 500) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _thread_batch(session: Session, records: Sequence[RequestRecord]) -> dict[str, str]:
    """Thread a batch of chat records without an explicit conversation id, with a few bulk statements.

    The same rule as `thread_record`, in arrival order, and aware of what earlier records of the same
    batch created or extended (a UI's next turn may arrive in the same batch). Returns request id ->
    conversation id.
    """
    prepared = []
    wanted: set[str] = set()
    for record in records:
        messages = [normalize_message(m) for m in record.request_messages or ()]
        reply = normalize_message(record.response_message or {})
        reply.setdefault("role", "assistant")
        candidates = [
            (transcript_hash(messages[:n], normalized=True), n) for n in continuation_prefix_lengths(messages)
        ]
        wanted.update(h for h, _ in candidates)
        prepared.append((record, messages, reply, candidates))

    # The newest conversation per (hash, owner) among those stored before this batch.
    known: dict[tuple[str, str | None], _Conv] = {}
    table: sa.Table = Conversation.__table__  # type: ignore[assignment]
    if wanted:
        for chunk in _in_chunks(sorted(wanted)):
            stmt = sa.select(
                table.c.id, table.c.owner, table.c.transcript_hash, table.c.message_count, table.c.updated_at
            ).where(table.c.transcript_hash.in_(chunk))
            for row in session.execute(stmt):
                key = (row.transcript_hash, row.owner)
                seen = known.get(key)
                if seen is None or (row.updated_at, row.id) > (seen.updated_at, seen.id):
                    known[key] = _Conv(
                        row.id,
                        row.owner,
                        row.message_count or 0,
                        row.transcript_hash,
                        updated_at=row.updated_at,
                    )

    touched: dict[str, _Conv] = {}
    message_rows: list[dict[str, Any]] = []
    result: dict[str, str] = {}
    for record, messages, reply, candidates in prepared:
        owner = record.key_id
        finished = record.created_at + timedelta(milliseconds=max(record.latency_ms, 0.0))
        conv: _Conv | None = None
        start = 0
        for digest, n in candidates:
            conv = known.get((digest, owner))
            if conv is not None:
                start = n
                break
        if conv is None:
            conv = _Conv(
                new_uuid7(),
                owner,
                0,
                None,
                new=True,
                title=title_from_messages(messages),
                model=record.model or record.model_requested,
                created_at=record.created_at,
            )
        new_messages = [*messages[start:], reply]
        for offset, msg in enumerate(new_messages):
            message_rows.append(
                {
                    "conversation_id": conv.id,
                    "position": conv.count + offset,
                    "role": str(msg.get("role")),
                    "content": msg.get("content"),
                    "name": msg.get("name"),
                    "tool_calls": msg.get("tool_calls"),
                    "tool_call_id": msg.get("tool_call_id"),
                    "request_id": record.request_id,
                    "created_at": finished,
                }
            )
        if conv.transcript_hash is not None:
            known.pop((conv.transcript_hash, owner), None)
        conv.count += len(new_messages)
        conv.added += len(new_messages)
        conv.transcript_hash = transcript_hash([*messages, reply], normalized=True)
        conv.updated_at = max(conv.updated_at, finished) if conv.updated_at else finished
        usage = record.usage
        conv.prompt_tokens += usage.prompt_tokens
        conv.completion_tokens += usage.completion_tokens
        conv.total_tokens += usage.total_tokens
        known[(conv.transcript_hash, owner)] = conv
        touched[conv.id] = conv
        result[record.request_id] = conv.id

    created = [c for c in touched.values() if c.new]
    if created:
        session.execute(
            table.insert(),
            [
                {
                    "id": c.id,
                    "title": _clip_to(table.c.title, c.title),
                    "owner": c.owner,
                    "model": _clip_to(table.c.model, c.model),
                    "system_prompt": None,
                    "created_at": c.created_at,
                    "updated_at": c.updated_at,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "total_tokens": c.total_tokens,
                    "message_count": c.count,
                    "transcript_hash": c.transcript_hash,
                }
                for c in created
            ],
        )
    extended = [c for c in touched.values() if not c.new]
    if extended:
        session.execute(
            table.update()
            .where(table.c.id == sa.bindparam("b_id"))
            .values(
                message_count=table.c.message_count + sa.bindparam("b_added"),
                prompt_tokens=table.c.prompt_tokens + sa.bindparam("b_prompt"),
                completion_tokens=table.c.completion_tokens + sa.bindparam("b_completion"),
                total_tokens=table.c.total_tokens + sa.bindparam("b_total"),
                transcript_hash=sa.bindparam("b_hash"),
                updated_at=sa.bindparam("b_updated"),
            ),
            [
                {
                    "b_id": c.id,
                    "b_added": c.added,
                    "b_prompt": c.prompt_tokens,
                    "b_completion": c.completion_tokens,
                    "b_total": c.total_tokens,
                    "b_hash": c.transcript_hash,
                    "b_updated": c.updated_at,
                }
                for c in extended
            ],
        )
    if message_rows:
        session.execute(_MESSAGES.insert(), message_rows)  # Core: no ORM bookkeeping per row
    return result


def _well_formed(record: RequestRecord) -> bool:
    """Whether every message is a mapping with a role (else the careful path decides what to keep)."""
    messages = [*(record.request_messages or ()), record.response_message]
    return all(
        isinstance(m, dict)
        and isinstance(m.get("role", "assistant" if m is record.response_message else None), str)
        for m in messages
    )


def _clip_to(column: Any, value: Any) -> Any:
    length = getattr(column.type, "length", None)
    if length is not None and isinstance(value, str) and len(value) > length:
        return value[:length]
    return value


def _write(
    engine: Engine, records: Sequence[RequestRecord], record_content: bool, *, bulk: bool = True
) -> int:
    """One transaction: the batch's request_log rows and, with content, its conversations.

    `bulk` threads the auto-threaded chat records with a few statements for the whole batch (the normal
    path); without it each record is threaded on its own in a savepoint (the careful path, used when a
    batch was refused and records are retried one by one).
    """
    writer = engine.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
    with Session(writer, expire_on_commit=False) as session, session.begin():
        log = RequestLogRepository(session)
        done = log.existing_ids(r.request_id for r in records)
        todo: list[RequestRecord] = []
        for record in records:
            if record.request_id in done:
                continue  # already written (a replay): neither the row nor the messages again
            done.add(record.request_id)
            todo.append(record)

        def threadable(r: RequestRecord) -> bool:
            return bool(record_content and r.request_messages and r.response_message is not None)

        threaded: dict[str, str | None] = {}
        if bulk:
            automatic = [r for r in todo if threadable(r) and not r.conversation_id and _well_formed(r)]
            if automatic:
                threaded.update(_thread_batch(session, automatic))
        for record in todo:
            if record.request_id in threaded or not threadable(record):
                continue
            threaded[record.request_id] = _thread_in_savepoint(session, record)
        rows: list[dict[str, Any]] = []
        for record in todo:
            if record.request_id in threaded:
                conversation_id = threaded[record.request_id]
            else:
                conversation_id = record.conversation_id
                if conversation_id and len(conversation_id) > _CONVERSATION_ID_MAX:
                    conversation_id = None
            rows.append(record_to_row(record, conversation_id))
        log.insert_ignore(rows)
        return len(rows)


@dataclasses.dataclass(slots=True)
class BatchResult:
    """What a batch write did: rows newly written, and records the database refused (with the reason)."""

    written: int = 0
    rejected: list[tuple[RequestRecord, str]] = dataclasses.field(default_factory=list)


def write_batch(engine: Engine, records: Sequence[RequestRecord], *, record_content: bool) -> BatchResult:
    """Write records in one transaction, idempotently on request_id.

    Raises when the database is unavailable (see `is_transient`): nothing of the batch is committed then.
    If the database refuses the batch for a data reason, the records are written one per transaction and
    those refused on their own are returned as rejected.
    """
    if not records:
        return BatchResult()
    try:
        return BatchResult(written=_write(engine, records, record_content))
    except Exception as exc:
        if is_transient(exc):
            raise
        logger.warning(
            "batch of %d refused (%s: %s); writing one by one", len(records), type(exc).__name__, exc
        )
    result = BatchResult()
    for record in records:
        try:
            result.written += _write(engine, [record], record_content, bulk=False)
        except Exception as exc:
            if is_transient(exc):
                raise
            result.rejected.append((record, f"{type(exc).__name__}: {exc}"))
    return result
