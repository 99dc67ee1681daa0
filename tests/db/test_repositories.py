"""Repositories on SQLite and PostgreSQL: request log, conversations, api keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db.models import Message
from llm_backend.db.repositories import (
    ApiKeyRepository,
    ConversationRepository,
    InvalidCursor,
    RequestLogRepository,
    hash_api_key,
)
from llm_backend.db.session import session_scope
from llm_backend.recording.threading import transcript_hash

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def log_row(request_id: str, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": request_id,
        "created_at": T0,
        "route": "/v1/chat/completions",
        "operation": "chat",
        "status_code": 200,
        "outcome": "ok",
        "error_type": None,
        "stream": False,
        "model_requested": "gpt-4o",
        "model": "gpt-4o",
        "provider": "azure",
        "backend": "east",
        "deployment": "gpt-4o-dep",
        "attempts": 1,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cached_tokens": None,
        "reasoning_tokens": None,
        "tokens_estimated": False,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "key_id": "key_a",
        "user": None,
        "client_ip": "10.0.0.1",
        "conversation_id": None,
    }
    row.update(overrides)
    return row


# -- request log ------------------------------------------------------------------------------------------


def test_insert_ignore_is_idempotent(engine: Engine) -> None:
    with session_scope(engine) as session:
        RequestLogRepository(session).insert_ignore([log_row("r1"), log_row("r2")])
    with session_scope(engine) as session:
        repo = RequestLogRepository(session)
        # r1 again (changed), r3 new, r3 twice within the batch: first wins, nothing raises
        repo.insert_ignore([log_row("r1", total_tokens=999), log_row("r3"), log_row("r3", total_tokens=7)])
    with session_scope(engine) as session:
        repo = RequestLogRepository(session)
        assert repo.count() == 3
        r1 = repo.get("r1")
        r3 = repo.get("r3")
        assert r1 is not None and r1.total_tokens == 15
        assert r3 is not None and r3.total_tokens == 15
        assert repo.existing_ids(["r1", "r2", "zz"]) == {"r1", "r2"}


def test_request_log_created_at_is_aware_utc(engine: Engine) -> None:
    local = datetime(2025, 3, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    with session_scope(engine) as session:
        RequestLogRepository(session).insert_ignore([log_row("tz", created_at=local)])
    with session_scope(engine) as session:
        row = RequestLogRepository(session).get("tz")
        assert row is not None
        assert row.created_at == local
        assert row.created_at.utcoffset() == timedelta(0)


def test_insert_rejects_unknown_columns(engine: Engine) -> None:
    with session_scope(engine) as session, pytest.raises(ValueError, match="unknown"):
        RequestLogRepository(session).insert_ignore([{**log_row("x"), "nope": 1}])


def test_usage_summary(engine: Engine) -> None:
    rows = [
        log_row("a1", key_id="key_a", model="gpt-4o", created_at=T0),
        log_row("a2", key_id="key_a", model="gpt-4o", created_at=T0 + timedelta(hours=1), cached_tokens=4),
        log_row("a3", key_id="key_a", model="gpt-4o-mini", created_at=T0 + timedelta(days=1)),
        log_row("b1", key_id="key_b", model="gpt-4o", created_at=T0, tokens_estimated=True, outcome="error"),
        log_row("old", key_id="key_b", model="gpt-4o", created_at=T0 - timedelta(days=30)),
    ]
    with session_scope(engine) as session:
        RequestLogRepository(session).insert_ignore(rows)
    with session_scope(engine) as session:
        repo = RequestLogRepository(session)
        since, until = T0 - timedelta(days=1), T0 + timedelta(days=7)
        by_all = repo.usage_summary(since=since, until=until)
        keyed = {(r.key_id, r.model, r.day): r for r in by_all}
        assert set(keyed) == {
            ("key_a", "gpt-4o", "2025-03-01"),
            ("key_a", "gpt-4o-mini", "2025-03-02"),
            ("key_b", "gpt-4o", "2025-03-01"),
        }
        a = keyed[("key_a", "gpt-4o", "2025-03-01")]
        assert (a.requests, a.prompt_tokens, a.completion_tokens, a.total_tokens, a.cached_tokens) == (
            2,
            20,
            10,
            30,
            4,
        )
        b = keyed[("key_b", "gpt-4o", "2025-03-01")]
        assert (b.requests, b.errors, b.estimated) == (1, 1, 1)

        by_key = repo.usage_summary(since=since, until=until, group_by=["key"])
        assert [(r.key_id, r.requests, r.total_tokens, r.model, r.day) for r in by_key] == [
            ("key_a", 3, 45, None, None),
            ("key_b", 1, 15, None, None),
        ]
        totals = repo.usage_summary(since=since, until=until, group_by=[], model="gpt-4o")
        assert len(totals) == 1 and totals[0].requests == 3
        only_b = repo.usage_summary(
            since=T0 - timedelta(days=60), until=until, group_by=["key"], key_id="key_b"
        )
        assert [(r.key_id, r.requests) for r in only_b] == [("key_b", 2)]
        with pytest.raises(ValueError):
            repo.usage_summary(since=since, until=until, group_by=["color"])


# -- conversations ----------------------------------------------------------------------------------------


def test_conversation_create_get_append(engine: Engine) -> None:
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        conv = repo.create(title="Hello", owner="key_a", model="gpt-4o", system_prompt="Be brief.")
        cid = conv.id
        repo.append_messages(
            conv,
            [
                {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": None},
                {"role": "assistant", "content": "hey", "refusal": None, "tool_calls": []},
            ],
            request_id="r1",
            prompt_tokens=3,
            completion_tokens=2,
            total_tokens=5,
        )
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        repo.append_messages(
            cid,
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                            "index": 0,
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
            request_id="r2",
            total_tokens=1,
        )
    with session_scope(engine) as session:
        conv2 = ConversationRepository(session).get(cid)
        assert conv2 is not None
        assert (conv2.title, conv2.owner, conv2.model, conv2.system_prompt) == (
            "Hello",
            "key_a",
            "gpt-4o",
            "Be brief.",
        )
        assert [m.position for m in conv2.messages] == [0, 1, 2, 3]
        dicts = [m.to_dict() for m in conv2.messages]
        assert dicts == [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hey"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
        assert [m.request_id for m in conv2.messages] == ["r1", "r1", "r2", "r2"]
        assert (conv2.prompt_tokens, conv2.completion_tokens, conv2.total_tokens) == (3, 2, 6)
        assert conv2.message_count == 4
        assert conv2.transcript_hash == transcript_hash(dicts)
        assert conv2.updated_at >= conv2.created_at
        assert ConversationRepository(session).get(cid, owner="key_other") is None
        assert ConversationRepository(session).get("missing") is None


def test_conversation_content_parts_roundtrip(engine: Engine) -> None:
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        conv = repo.create()
        repo.append_messages(conv, [{"role": "user", "content": parts}])
        cid = conv.id
    with session_scope(engine) as session:
        msgs = ConversationRepository(session).messages(cid)
        assert msgs[0].content == parts


def test_conversation_rename_and_delete_cascades(engine: Engine) -> None:
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        conv = repo.create(title="old", owner="key_a")
        repo.append_messages(conv, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
        cid = conv.id
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        assert repo.rename(cid, "new", owner="key_b") is None
        renamed = repo.rename(cid, "new")
        assert renamed is not None and renamed.title == "new"
        assert repo.rename("missing", "x") is None
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        assert repo.delete(cid, owner="key_b") is False
        assert repo.delete(cid) is True
        assert repo.delete(cid) is False
    with session_scope(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0


def _seed_conversations(engine: Engine) -> list[str]:
    ids = []
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        for i in range(7):
            conv = repo.create(
                title=f"Chat {i} about {'Python' if i % 2 else 'Rust_lang'}",
                owner="key_a" if i < 5 else "key_b",
                model="gpt-4o" if i % 3 else "gpt-4o-mini",
                created_at=T0 + timedelta(minutes=i),
            )
            ids.append(conv.id)
        # two conversations with the same updated_at: the id breaks the tie
        same = T0 + timedelta(hours=5)
        for cid in ids[2:4]:
            c = repo.get(cid, with_messages=False)
            assert c is not None
            c.updated_at = same
    return ids


def test_conversation_list_cursor_pagination(engine: Engine) -> None:
    ids = _seed_conversations(engine)
    seen: list[str] = []
    cursor = None
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        full = repo.list(limit=100)
        assert full.next_cursor is None
        expected = [c.id for c in full.items]
        assert len(expected) == 7
        pairs = [(c.updated_at, c.id) for c in full.items]
        assert pairs == sorted(pairs, reverse=True)
        pages = 0
        while True:
            page = repo.list(limit=2, cursor=cursor)
            pages += 1
            seen.extend(c.id for c in page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    assert seen == expected and sorted(seen) == sorted(ids)
    assert pages == 4


def test_conversation_list_filters(engine: Engine) -> None:
    _seed_conversations(engine)
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        assert len(repo.list(owner="key_a").items) == 5
        assert len(repo.list(owner="key_b").items) == 2
        assert {c.model for c in repo.list(model="gpt-4o-mini").items} == {"gpt-4o-mini"}
        assert len(repo.list(model="gpt-4o-mini").items) == 3
        assert len(repo.list(q="python").items) == 3
        assert len(repo.list(q="PYTHON", owner="key_a").items) == 2
        assert len(repo.list(q="rust_").items) == 4  # "_" is literal, not a wildcard
        assert len(repo.list(q="rust%").items) == 0
        window = repo.list(created_from=T0 + timedelta(minutes=2), created_to=T0 + timedelta(minutes=4))
        assert len(window.items) == 2
        with pytest.raises(InvalidCursor):
            repo.list(cursor="not-a-cursor")


def test_find_by_transcript_hash_respects_owner(engine: Engine) -> None:
    transcript = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    h = transcript_hash(transcript)
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        mine = repo.create(owner="key_a")
        repo.append_messages(mine, transcript)
        anonymous = repo.create(owner=None)
        repo.append_messages(anonymous, transcript)
        mine_id, anon_id = mine.id, anonymous.id
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        found = repo.find_by_transcript_hash(h, owner="key_a")
        assert found is not None and found.id == mine_id
        found = repo.find_by_transcript_hash([h, "0" * 64], owner=None)
        assert found is not None and found.id == anon_id
        assert repo.find_by_transcript_hash(h, owner="key_b") is None
        assert repo.find_by_transcript_hash([], owner="key_a") is None


# -- api keys ---------------------------------------------------------------------------------------------


def test_api_keys(engine: Engine) -> None:
    secret = "sk-llmb-0123456789abcdef"
    expires = T0 + timedelta(days=30)
    with session_scope(engine) as session:
        repo = ApiKeyRepository(session)
        key = repo.create(
            name="ci",
            owner="team-a",
            key_hash=hash_api_key(secret),
            key_prefix=secret[:12],
            allowed_models=["gpt-4o"],
            rpm=60,
            daily_tokens=1_000_000,
            allowed_ips=["10.0.0.0/8"],
            expires_at=expires,
        )
        other = repo.create(
            name="other", key_hash=hash_api_key("sk-other"), key_prefix="sk-other", enabled=False
        )
        key_id, other_id = key.id, other.id
        assert key_id.startswith("key_")
    with session_scope(engine) as session:
        repo = ApiKeyRepository(session)
        got = repo.get_by_hash(hash_api_key(secret))
        assert got is not None and got.id == key_id
        assert got.allowed_models == ["gpt-4o"] and got.allowed_ips == ["10.0.0.0/8"]
        assert got.expires_at == expires and got.enabled is True and got.last_used_at is None
        assert got.tpm is None and got.monthly_tokens is None
        assert repo.get_by_hash(hash_api_key("wrong")) is None
        assert [k.id for k in repo.list()] == [key_id, other_id]
        assert [k.id for k in repo.list(enabled=False)] == [other_id]
        assert [k.id for k in repo.list(owner="team-a")] == [key_id]
        updated = repo.update(key_id, rpm=120, allowed_models=None, enabled=False)
        assert updated is not None and updated.rpm == 120 and updated.allowed_models is None
        assert repo.update("key_missing", rpm=1) is None
        with pytest.raises(ValueError):
            repo.update(key_id, key_hash="x")
        repo.touch(key_id, T0)
    with session_scope(engine) as session:
        repo = ApiKeyRepository(session)
        got = repo.get(key_id)
        assert (
            got is not None and got.last_used_at == T0 and got.enabled is False and got.allowed_models is None
        )
        assert repo.delete(other_id) is True
        assert repo.delete(other_id) is False
        assert [k.id for k in repo.list()] == [key_id]


def test_api_key_hash_is_unique(engine: Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError), session_scope(engine) as session:
        repo = ApiKeyRepository(session)
        repo.create(name="a", key_hash=hash_api_key("same"), key_prefix="s")
        repo.create(name="b", key_hash=hash_api_key("same"), key_prefix="s")
