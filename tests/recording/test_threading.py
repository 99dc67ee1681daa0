"""Conversation threading: message normalisation, transcript hashes, and threading through batch writes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db.models import Conversation, Message, RequestLog
from llm_backend.db.repositories import ConversationRepository, RequestLogRepository
from llm_backend.db.session import session_scope
from llm_backend.recording.records import OUTCOME_ERROR, Usage
from llm_backend.recording.sink import write_batch
from llm_backend.recording.threading import (
    continuation_prefix_lengths,
    normalize_message,
    title_from_messages,
    transcript_hash,
)
from tests.recording.conftest import MakeRecord

# -- pure functions ---------------------------------------------------------------------------------------


def test_normalize_message_drops_empty_and_unknown_fields() -> None:
    raw = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "audio": None,
        "name": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "index": 0,
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}', "extra": 1},
            }
        ],
    }
    assert normalize_message(raw) == {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    }


def test_normalize_message_text_parts_become_string_other_parts_stay() -> None:
    assert normalize_message(
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ) == {
        "role": "user",
        "content": "a\nb",
    }
    image = [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
    ]
    assert normalize_message({"role": "user", "content": image}) == {"role": "user", "content": image}
    assert normalize_message({"role": "user", "content": []}) == {"role": "user"}


def test_normalize_message_is_idempotent() -> None:
    msg = {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob", "tool_call_id": None}
    once = normalize_message(msg)
    assert normalize_message(once) == once == {"role": "user", "content": "hi", "name": "bob"}


def test_transcript_hash_ignores_representation_differences() -> None:
    a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "refusal": None}]
    b = [
        {"content": [{"type": "text", "text": "hi"}], "role": "user"},
        {"role": "assistant", "content": "hello"},
    ]
    assert transcript_hash(a) == transcript_hash(b)
    assert len(transcript_hash(a)) == 64
    assert transcript_hash(a) != transcript_hash([*a, {"role": "user", "content": "more"}])
    assert transcript_hash(a) != transcript_hash([{"role": "user", "content": "hi!"}, a[1]])


def test_title_from_messages() -> None:
    long = "Explain   the\ndifference between processes and threads in operating systems, with examples"
    title = title_from_messages([{"role": "system", "content": "sys"}, {"role": "user", "content": long}])
    assert title == "Explain the difference between processes and threads in oper"
    assert title is not None and len(title) == 60
    assert title_from_messages([{"role": "system", "content": "x"}]) is None


def test_continuation_prefix_lengths() -> None:
    u, a, s = {"role": "user"}, {"role": "assistant"}, {"role": "system"}
    assert continuation_prefix_lengths([u]) == []
    assert continuation_prefix_lengths([s, u]) == [1]
    assert continuation_prefix_lengths([s, u, a, u]) == [3]
    tool_round = [u, {"role": "assistant", "tool_calls": []}, {"role": "tool"}]
    assert continuation_prefix_lengths(tool_round) == [2]


# -- threading through write_batch ------------------------------------------------------------------------


def _reply(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text, "refusal": None, "annotations": [], "tool_calls": None}


def _conversations(engine: Engine) -> list[tuple[Conversation, list[dict[str, Any]]]]:
    with session_scope(engine) as session:
        repo = ConversationRepository(session)
        out = []
        for conv in session.scalars(
            sa.select(Conversation).order_by(Conversation.created_at, Conversation.id)
        ):
            out.append((conv, [m.to_dict() for m in repo.messages(conv.id)]))
        return out


def _log(engine: Engine, request_id: str) -> RequestLog:
    with session_scope(engine) as session:
        row = RequestLogRepository(session).get(request_id)
        assert row is not None
        return row


def test_three_turns_chatbot_ui_style_make_one_conversation(engine: Engine, make_record: MakeRecord) -> None:
    system = {"role": "system", "content": "You are helpful."}
    history: list[dict[str, Any]] = [system]
    request_ids = []
    for turn, (question, answer) in enumerate(
        [("Hi there", "Hello!"), ("How are you?", "Fine."), ("Bye", "Bye!")]
    ):
        # the UI resends the whole history, in its own representation (parts for user text), and no id
        history.append({"role": "user", "content": [{"type": "text", "text": question}]})
        record = make_record(
            key_id="key_a",
            request_messages=list(history),
            response_message=_reply(answer),
            usage=Usage(prompt_tokens=10 * (turn + 1), completion_tokens=2, total_tokens=10 * (turn + 1) + 2),
        )
        write_batch(engine, [record], record_content=True)
        request_ids.append(record.request_id)
        history.append({"role": "assistant", "content": answer})

    convs = _conversations(engine)
    assert len(convs) == 1
    conv, messages = convs[0]
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    non_system = [m for m in messages if m["role"] != "system"]
    assert len(non_system) == 6
    assert [m["content"] for m in non_system] == [
        "Hi there",
        "Hello!",
        "How are you?",
        "Fine.",
        "Bye",
        "Bye!",
    ]
    assert conv.title == "Hi there" and conv.owner == "key_a" and conv.model == "gpt-4o"
    assert conv.message_count == 7
    assert (conv.prompt_tokens, conv.completion_tokens, conv.total_tokens) == (60, 6, 66)
    assert conv.transcript_hash == transcript_hash(messages)
    assert {_log(engine, rid).conversation_id for rid in request_ids} == {conv.id}


def test_three_turns_in_one_batch_thread_in_order(engine: Engine, make_record: MakeRecord) -> None:
    u1, a1 = {"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}
    u2, a2 = {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}
    u3 = {"role": "user", "content": "three"}
    records = [
        make_record(request_messages=[u1], response_message=a1),
        make_record(request_messages=[u1, a1, u2], response_message=a2),
        make_record(
            request_messages=[u1, a1, u2, a2, u3], response_message={"role": "assistant", "content": "3"}
        ),
    ]
    write_batch(engine, records, record_content=True)
    convs = _conversations(engine)
    assert len(convs) == 1
    assert [m["content"] for m in convs[0][1]] == ["one", "1", "two", "2", "three", "3"]


def test_different_owner_does_not_continue(engine: Engine, make_record: MakeRecord) -> None:
    u1, a1 = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    write_batch(
        engine, [make_record(key_id="key_a", request_messages=[u1], response_message=a1)], record_content=True
    )
    second = make_record(
        key_id="key_b",
        request_messages=[u1, a1, {"role": "user", "content": "and?"}],
        response_message=_reply("so"),
    )
    write_batch(engine, [second], record_content=True)
    convs = _conversations(engine)
    assert len(convs) == 2
    owners = {conv.owner: msgs for conv, msgs in convs}
    assert [m["content"] for m in owners["key_a"]] == ["hi", "hello"]
    assert [m["content"] for m in owners["key_b"]] == ["hi", "hello", "and?", "so"]


def test_explicit_conversation_id_wins(engine: Engine, make_record: MakeRecord) -> None:
    u1, a1 = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    # an auto-threaded conversation that would match by hash
    write_batch(engine, [make_record(request_messages=[u1], response_message=a1)], record_content=True)
    # a new explicit id: created with that id, holding all messages + reply
    first = make_record(conversation_id="conv-x", request_messages=[u1], response_message=a1)
    write_batch(engine, [first], record_content=True)
    # continuing with the full history: only the new messages are appended (stored prefix matches)
    u2 = {"role": "user", "content": "again"}
    second = make_record(
        conversation_id="conv-x", request_messages=[u1, a1, u2], response_message=_reply("ok")
    )
    # a client that sends a different history with the id: only its final user message is appended
    third = make_record(
        conversation_id="conv-x",
        request_messages=[{"role": "user", "content": "unrelated"}, {"role": "user", "content": "last"}],
        response_message=_reply("done"),
    )
    write_batch(engine, [second, third], record_content=True)
    convs = {conv.id: msgs for conv, msgs in _conversations(engine)}
    assert len(convs) == 2
    assert [m["content"] for m in convs["conv-x"]] == ["hi", "hello", "again", "ok", "last", "done"]
    others = [msgs for cid, msgs in convs.items() if cid != "conv-x"]
    assert [m["content"] for m in others[0]] == ["hi", "hello"]
    assert _log(engine, third.request_id).conversation_id == "conv-x"


def test_explicit_id_of_another_owner_is_not_appended_to(engine: Engine, make_record: MakeRecord) -> None:
    u1, a1 = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    write_batch(
        engine,
        [make_record(key_id="key_a", conversation_id="conv-a", request_messages=[u1], response_message=a1)],
        record_content=True,
    )
    intruder = make_record(
        key_id="key_b", conversation_id="conv-a", request_messages=[u1], response_message=a1
    )
    write_batch(engine, [intruder], record_content=True)
    convs = {conv.id: (conv.owner, msgs) for conv, msgs in _conversations(engine)}
    assert len(convs["conv-a"][1]) == 2
    assert _log(engine, intruder.request_id).conversation_id != "conv-a"


def test_record_content_off_stores_usage_only(engine: Engine, make_record: MakeRecord) -> None:
    record = make_record(
        request_messages=[{"role": "user", "content": "secret"}],
        response_message=_reply("classified"),
        conversation_id="conv-given",
    )
    write_batch(engine, [record], record_content=False)
    assert _conversations(engine) == []
    row = _log(engine, record.request_id)
    assert row.total_tokens == 15 and row.conversation_id == "conv-given"
    with session_scope(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0


def test_failed_request_is_logged_without_conversation(engine: Engine, make_record: MakeRecord) -> None:
    record = make_record(
        status_code=502,
        outcome=OUTCOME_ERROR,
        error_type="upstream_error",
        request_messages=[{"role": "user", "content": "hi"}],
        response_message=None,
    )
    write_batch(engine, [record], record_content=True)
    assert _conversations(engine) == []
    row = _log(engine, record.request_id)
    assert (row.status_code, row.outcome, row.error_type) == (502, "error", "upstream_error")


def test_threading_data_error_still_logs_the_request(engine: Engine, make_record: MakeRecord) -> None:
    bad = make_record(request_messages=[{"content": "no role"}], response_message=_reply("x"))
    good = make_record(request_messages=[{"role": "user", "content": "fine"}], response_message=_reply("y"))
    result = write_batch(engine, [bad, good], record_content=True)
    assert result.written == 2 and result.rejected == []
    assert _log(engine, bad.request_id).conversation_id is None
    convs = _conversations(engine)
    assert len(convs) == 1 and [m["content"] for m in convs[0][1]] == ["fine", "y"]


def test_replayed_record_is_not_threaded_twice(engine: Engine, make_record: MakeRecord) -> None:
    record = make_record(
        request_messages=[{"role": "user", "content": "hi"}], response_message=_reply("hello")
    )
    assert write_batch(engine, [record], record_content=True).written == 1
    assert write_batch(engine, [record, record], record_content=True).written == 0
    convs = _conversations(engine)
    assert len(convs) == 1 and len(convs[0][1]) == 2


def test_overlong_fields_are_clipped_not_rejected(engine: Engine, make_record: MakeRecord) -> None:
    record = make_record(model="m" * 400, error_type="e" * 400, conversation_id="c" * 100)
    result = write_batch(engine, [record], record_content=True)
    assert result.written == 1
    row = _log(engine, record.request_id)
    assert row.model == "m" * 255 and row.conversation_id is None
