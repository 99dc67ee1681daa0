"""Writing recorded requests to the database: row mapping, conversation threading, batch transactions."""

from __future__ import annotations

import dataclasses
import hashlib
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
from llm_backend.recording.records import RequestRecord, Usage, record_owner, storable_record
from llm_backend.recording.threading import (
    continuation_prefix_lengths,
    helper_title,
    is_helper_request,
    normalize_message,
    system_prompt_of,
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
        "user_id": record.user_id,
        "team_id": record.team_id,
        "client_ip": record.client_ip,
        "conversation_id": conversation_id,
        "client_request_id": record.client_request_id,
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


def _exchange_kwargs(record: RequestRecord) -> dict[str, Any]:
    usage = record.usage
    return {
        "request_id": record.request_id,
        "created_at": record.created_at + timedelta(milliseconds=max(record.latency_ms, 0.0)),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _continue(
    repo: ConversationRepository,
    conv: Conversation,
    messages: list[dict[str, Any]],
    reply: dict[str, Any],
    append_kwargs: dict[str, Any],
    *,
    by_client: bool = False,
    continues: bool = False,
) -> None:
    """Add one exchange to a conversation named by id (ours or the client's chat id).

    With `continues` (a Responses API chain) the messages are the new turns and are appended as they are.

    The messages past the stored ones are appended when the stored transcript is a prefix of the request;
    nothing but the usage when the stored transcript already holds the whole exchange (a later turn of
    the chat was written first); only the reply when the request is the stored chat up to an earlier
    turn (a regenerated answer); otherwise only the final user message. The reply is appended. Named by
    the client's chat id (`by_client`), a request that does not begin as the chat does adds no messages.
    """
    stored = list(conv.messages)
    count = len(stored)
    exchange = [*messages, reply]
    if count == 0:
        new = exchange
        conv.title = conv.title or title_from_messages(messages)
        conv.system_prompt = conv.system_prompt or system_prompt_of(messages)
    elif continues:
        new = exchange
    elif len(exchange) <= count and transcript_hash(
        [m.to_dict() for m in stored[: len(exchange)]]
    ) == transcript_hash(exchange, normalized=True):
        repo.append_messages(conv, [], **append_kwargs)
        stored[len(exchange) - 1].request_id = append_kwargs["request_id"]  # the reply is this request's
        return
    elif (
        len(messages) >= count and transcript_hash(messages[:count], normalized=True) == conv.transcript_hash
    ):
        new = exchange[count:]
    elif len(messages) < count and transcript_hash(
        [m.to_dict() for m in stored[: len(messages)]]
    ) == transcript_hash(messages, normalized=True):
        new = [reply]  # a regenerated answer: the request is the stored chat up to a turn answered before
    elif by_client and not _shares_opening(stored, messages):
        # Named by the UI's chat id but quoting nothing of the chat's start: a helper task of a form we
        # do not know (a custom title prompt), not a turn. Filed under the chat, added to nothing.
        repo.append_messages(conv, [], **append_kwargs)
        return
    else:
        users = [m for m in messages if m.get("role") == "user"]
        new = [*users[-1:], reply]
    repo.append_messages(conv, new, **append_kwargs)


def _shares_opening(stored: Sequence[Message], messages: list[dict[str, Any]]) -> bool:
    """Whether a request begins as the stored chat does: its first message past a system prompt is the
    same (an edited or regenerated later turn still does; a prompt that quotes the chat does not)."""
    first = next((i for i, m in enumerate(stored) if m.role not in ("system", "developer")), None)
    return first is not None and len(messages) > first and stored[first].to_dict() == messages[first]


def _thread_helper(
    repo: ConversationRepository,
    record: RequestRecord,
    messages: list[dict[str, Any]],
    reply: dict[str, Any],
) -> str | None:
    """A UI's helper task (title, tags, follow-ups): never a conversation of its own, nor messages of one.

    Named by a conversation (our id, or the client's chat id, whose conversation it creates empty when
    the chat's first turn is not written yet), it counts toward that conversation's usage and a title
    it got back becomes the conversation's title, as the UI shows it. Unnamed, it is a request without a
    conversation: which chat it quotes cannot be told for sure, and guessing would misfile it.
    """
    owner = record_owner(record)
    conv: Conversation | None = None
    explicit = record.conversation_id
    if explicit and len(explicit) <= _CONVERSATION_ID_MAX:
        found = repo.get(explicit, with_messages=True)
        if found is not None and (found.owner is None or found.owner == owner):
            conv = found
    elif record.external_conversation_id:
        conv = repo.get_by_external_id(record.external_conversation_id, owner=owner)
        if conv is None:
            conv = repo.create(
                owner=owner,
                team_id=record.team_id,
                model=record.model or record.model_requested,
                created_at=record.created_at,
                external_id=record.external_conversation_id,
            )
    if conv is None:
        return None
    title = helper_title(messages, reply)
    if title:
        conv.title = title
    repo.append_messages(conv, [], **_exchange_kwargs(record))
    return conv.id


def thread_record(repo: ConversationRepository, record: RequestRecord) -> str | None:
    """Store the exchange of a chat record in a conversation; returns the conversation id.

    An explicit conversation id (X-Conversation-Id) wins, then the client's chat id (the owner's
    conversation keyed by it; one that was threaded before the chat id came is adopted), each continued
    by `_continue`. Without either, the request continues the owner's conversation whose transcript
    equals the messages before its final user turn; otherwise a new conversation holds all messages and
    remembers the transcript it looked for (`parent_hash`), so that the record which has that transcript,
    written later by another worker, adopts it. A UI's helper task is no turn (`_thread_helper`).
    """
    if not record.request_messages or record.response_message is None:
        return record.conversation_id
    messages = [normalize_message(m) for m in record.request_messages]
    reply = normalize_message(record.response_message)
    reply.setdefault("role", "assistant")
    if is_helper_request(messages):
        return _thread_helper(repo, record, messages, reply)
    append_kwargs = _exchange_kwargs(record)
    owner = record_owner(record)
    model = record.model or record.model_requested
    new_conversation: dict[str, Any] = {
        "title": title_from_messages(messages),
        "owner": owner,
        "team_id": record.team_id,
        "model": model,
        "created_at": record.created_at,
        "system_prompt": system_prompt_of(messages),
    }

    explicit = record.conversation_id
    if explicit and len(explicit) <= _CONVERSATION_ID_MAX:
        conv = repo.get(explicit, with_messages=True)
        if conv is None:
            conv = repo.create(conversation_id=explicit, **new_conversation)
            repo.append_messages(conv, [*messages, reply], **append_kwargs)
            return conv.id
        if conv.owner is None or conv.owner == owner:
            _continue(repo, conv, messages, reply, append_kwargs, continues=record.continues)
            return conv.id
        logger.warning(
            "request %s names conversation %s of another owner; threading it on its own",
            record.request_id,
            explicit,
        )
    elif explicit:
        logger.warning("request %s: conversation id too long, ignored", record.request_id)

    lengths = _parent_lengths(messages)
    hashes = {transcript_hash(messages[:n], normalized=True): n for n in lengths}
    external = record.external_conversation_id
    if external:
        # The client's chat id is scoped to the owner: another key's chat of the same id is another chat.
        conv = repo.get_by_external_id(external, owner=owner)
        if conv is None and hashes:
            conv = repo.find_by_transcript_hash(list(hashes), owner=owner, unkeyed=True)
            if conv is not None:
                conv.external_id = external  # its earlier turns came without the chat id
        if conv is None:
            conv = repo.create(
                external_id=external, parent_hash=_parent_hash(messages, lengths), **new_conversation
            )
        _continue(repo, conv, messages, reply, append_kwargs, by_client=True)
        return conv.id

    match: Conversation | None = repo.find_by_transcript_hash(list(hashes), owner=owner) if hashes else None
    if match is not None and match.transcript_hash in hashes:
        new = messages[hashes[match.transcript_hash] :]
        repo.append_messages(match, [*new, reply], **append_kwargs)
        return match.id
    parent = _parent_hash(messages, lengths)
    conv = repo.create(parent_hash=parent, **new_conversation)
    repo.append_messages(conv, [*messages, reply], **append_kwargs)
    return conv.id


def _parent_lengths(messages: list[dict[str, Any]]) -> list[int]:
    """The prefix a request continues: the longest candidate only. In a tool-call round the shorter one
    (before the last user turn) also exists as a transcript while the tool call's own record is not
    written yet; continuing it there would leave that record no place when it comes. Waiting for it
    (an orphan that it adopts) keeps the chain whatever the order."""
    return continuation_prefix_lengths(messages)[:1]


def _parent_hash(messages: list[dict[str, Any]], lengths: Sequence[int]) -> str | None:
    """The transcript a new conversation's first record continues, to be adopted by: the longest candidate
    prefix that ends with an assistant message (every recorded exchange ends with its reply)."""
    for n in lengths:
        if messages[n - 1].get("role") == "assistant":
            return transcript_hash(messages[:n], normalized=True)
    return None


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
    system_prompt: str | None = None
    parent_hash: str | None = None
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
        candidates = [(transcript_hash(messages[:n], normalized=True), n) for n in _parent_lengths(messages)]
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
    teams: dict[str, str | None] = {}  # the team of each conversation created here
    message_rows: list[dict[str, Any]] = []
    result: dict[str, str] = {}
    for record, messages, reply, candidates in prepared:
        owner = record_owner(record)
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
                system_prompt=system_prompt_of(messages),
                parent_hash=_parent_hash(messages, [n for _, n in candidates]),
                model=record.model or record.model_requested,
                created_at=record.created_at,
            )
            teams[conv.id] = record.team_id
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
                    "team_id": teams.get(c.id),
                    "model": _clip_to(table.c.model, c.model),
                    "system_prompt": c.system_prompt,
                    "parent_hash": c.parent_hash,
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


def _bulk_threadable(record: RequestRecord) -> bool:
    """Whether the bulk path threads this record: automatic threading of a well-formed chat turn."""
    return (
        not record.conversation_id
        and not record.external_conversation_id
        and _well_formed(record)
        and not is_helper_request(record.request_messages or ())
    )


def _lock_key(owner: str | None) -> int:
    digest = hashlib.sha256(f"llm-backend.threading:{owner or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _serialize_threading(session: Session, records: Sequence[RequestRecord]) -> None:
    """Make this transaction the only one threading these owners' conversations until it commits.

    Threading reads conversations and then writes them; two workers' transactions that did so at once
    could each miss what the other writes (a turn and its next turn, split). PostgreSQL: one
    transaction-scoped advisory lock per owner, taken in a fixed order (no deadlock between writers);
    statements after it see what the previous holder committed. SQLite: the write transaction began
    IMMEDIATE, which already admits one writer at a time.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    for key in sorted({_lock_key(record_owner(r)) for r in records}):
        session.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _adopt_orphans(session: Session, conversation_ids: set[str]) -> dict[str, str]:
    """Merge into each conversation just written the orphans that continue it; returns orphan -> adopter.

    An orphan is a conversation whose first record continued an exchange that was not written yet (its
    `parent_hash`, the hash of that transcript). When a conversation's transcript now has that hash, the
    orphan's messages past it move over (positions carry on unchanged), its totals are added, its request
    rows point here, its client chat id (if any) passes on, and the orphan is deleted. With the per-owner
    lock this makes threading independent of the order in which workers write a chat's records.
    """
    table: sa.Table = Conversation.__table__  # type: ignore[assignment]
    merged: dict[str, str] = {}
    alive = set(conversation_ids)
    while alive:  # one merge per round, then look again with what it changed (merges are rare)
        heads: dict[str, Any] = {}
        for chunk in _in_chunks(sorted(alive)):
            stmt = sa.select(
                table.c.id, table.c.owner, table.c.external_id, table.c.transcript_hash, table.c.message_count
            ).where(table.c.id.in_(chunk), table.c.transcript_hash.is_not(None))
            heads.update((row.id, row) for row in session.execute(stmt))
        found: tuple[Any, Any] | None = None
        for chunk in _in_chunks(sorted({h.transcript_hash for h in heads.values()})):
            stmt = (
                sa.select(table)
                .where(table.c.parent_hash.in_(chunk))
                .order_by(table.c.created_at, table.c.id)
            )
            for orphan in session.execute(stmt):
                head = next(
                    (
                        h
                        for h in heads.values()
                        if h.transcript_hash == orphan.parent_hash
                        and h.owner == orphan.owner
                        and h.id != orphan.id
                        and orphan.message_count > h.message_count
                        # one chat id at most: a chat keyed by the client is never merged into another
                        and (not orphan.external_id or not h.external_id)
                    ),
                    None,
                )
                if head is not None:
                    found = (head, orphan)
                    break
            if found:
                break
        if found is None:
            break
        head, orphan = found
        _merge(session, head, orphan)
        merged[orphan.id] = head.id
        alive.discard(orphan.id)

    def final(cid: str) -> str:
        while cid in merged:
            cid = merged[cid]
        return cid

    if merged:
        logger.info("threading adopted %d conversation(s) written ahead of their start", len(merged))
    return {orphan: final(orphan) for orphan in merged}


def _merge(session: Session, head: Any, orphan: Any) -> None:
    """Move `orphan`'s messages past `head`'s transcript (which it starts with) into `head`; delete it."""
    table: sa.Table = Conversation.__table__  # type: ignore[assignment]
    log: sa.Table = RequestLog.__table__  # type: ignore[assignment]
    held = head.message_count
    created, updated = session.execute(
        sa.select(table.c.created_at, table.c.updated_at).where(table.c.id == head.id)
    ).one()
    session.execute(
        _MESSAGES.delete().where(_MESSAGES.c.conversation_id == orphan.id, _MESSAGES.c.position < held)
    )
    session.execute(
        _MESSAGES.update().where(_MESSAGES.c.conversation_id == orphan.id).values(conversation_id=head.id)
    )
    session.execute(log.update().where(log.c.conversation_id == orphan.id).values(conversation_id=head.id))
    session.execute(
        table.update()
        .where(table.c.id == head.id)
        .values(
            message_count=orphan.message_count,
            transcript_hash=orphan.transcript_hash,
            prompt_tokens=table.c.prompt_tokens + (orphan.prompt_tokens or 0),
            completion_tokens=table.c.completion_tokens + (orphan.completion_tokens or 0),
            total_tokens=table.c.total_tokens + (orphan.total_tokens or 0),
            created_at=min(created, orphan.created_at),
            updated_at=max(updated, orphan.updated_at),
        )
    )
    session.execute(table.delete().where(table.c.id == orphan.id))
    if orphan.external_id and not head.external_id:  # after the delete: (owner, external_id) is unique
        session.execute(table.update().where(table.c.id == head.id).values(external_id=orphan.external_id))


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
        to_thread = [r for r in todo if threadable(r)]
        if to_thread:
            _serialize_threading(session, to_thread)
        if bulk:
            automatic = [r for r in to_thread if _bulk_threadable(r)]
            if automatic:
                threaded.update(_thread_batch(session, automatic))
        for record in to_thread:
            if record.request_id not in threaded:
                threaded[record.request_id] = _thread_in_savepoint(session, record)
        if threaded:
            merged = _adopt_orphans(session, {c for c in threaded.values() if c})
            threaded = {rid: merged.get(c, c) if c else c for rid, c in threaded.items()}
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
    records = [storable_record(r) for r in records]  # texts PostgreSQL can store (no NUL), rows and JSON
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
