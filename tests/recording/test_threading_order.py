"""Threading whatever the order of writes: a chat's records written in any order make the same conversation.

Workers record write-behind, so a chat's next turn (or an agent's tool-call round) is often written before
the turn it continues. Each permutation of a chat's records, one batch each or all in one batch, must give
the conversation that writing them in order gives.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db.models import Conversation, Message, RequestLog
from llm_backend.db.session import session_scope
from llm_backend.recording.records import RequestRecord, Usage
from llm_backend.recording.sink import write_batch
from llm_backend.recording.threading import normalize_message
from tests.recording.conftest import MakeRecord

SYSTEM = {"role": "system", "content": "You plan trips."}
U1 = {"role": "user", "content": "Weather in Oslo?"}
A1 = {"role": "assistant", "content": "Let me check."}
U2 = {"role": "user", "content": "Please look it up."}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}
    ],
}
TOOL = {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"}
A3 = {"role": "assistant", "content": "4 degrees and rain."}
U4 = {"role": "user", "content": "Thanks!"}
A4 = {"role": "assistant", "content": "You're welcome."}

# (request messages, reply) of each record, in the order the chat made them
CHAT = [
    ([SYSTEM, U1], A1),
    ([SYSTEM, U1, A1, U2], CALL),
    ([SYSTEM, U1, A1, U2, CALL, TOOL], A3),  # the tool-call round: no new user turn
    ([SYSTEM, U1, A1, U2, CALL, TOOL, A3, U4], A4),
]
FULL = [normalize_message(m) for m in (SYSTEM, U1, A1, U2, CALL, TOOL, A3, U4, A4)]


def _records(make_record: MakeRecord, **kw: Any) -> list[RequestRecord]:
    return [
        make_record(
            key_id="key_a",
            request_messages=[dict(m) for m in messages],
            response_message=dict(reply),
            usage=Usage(prompt_tokens=10 + i, completion_tokens=1, total_tokens=11 + i),
            **kw,
        )
        for i, (messages, reply) in enumerate(CHAT)
    ]


def _state(engine: Engine) -> list[dict[str, Any]]:
    with session_scope(engine) as session:
        out = []
        for conv in session.scalars(
            sa.select(Conversation).order_by(Conversation.created_at, Conversation.id)
        ):
            messages = list(
                session.scalars(
                    sa.select(Message).where(Message.conversation_id == conv.id).order_by(Message.position)
                )
            )
            rows = session.scalars(
                sa.select(RequestLog.request_id).where(RequestLog.conversation_id == conv.id)
            )
            out.append(
                {
                    "conv": conv,
                    "messages": [m.to_dict() for m in messages],
                    "positions": [m.position for m in messages],
                    "reply_requests": [m.request_id for m in messages if m.role == "assistant"],
                    "rows": set(rows),
                }
            )
        return out


def _assert_one_conversation(engine: Engine, records: list[RequestRecord]) -> None:
    state = _state(engine)
    assert len(state) == 1, [(s["conv"].id, s["messages"]) for s in state]
    only = state[0]
    conv = only["conv"]
    assert only["messages"] == FULL
    assert only["positions"] == list(range(len(FULL)))
    assert conv.message_count == len(FULL)
    assert conv.system_prompt == SYSTEM["content"]
    assert conv.title == U1["content"]
    assert conv.parent_hash is None
    assert (conv.prompt_tokens, conv.completion_tokens, conv.total_tokens) == (46, 4, 50)
    assert conv.created_at == min(r.created_at for r in records)
    # every reply is credited to the request that produced it, every request row points here
    assert only["reply_requests"] == [r.request_id for r in records]
    assert only["rows"] == {r.request_id for r in records}


ORDERS = list(itertools.permutations(range(len(CHAT))))


@pytest.mark.parametrize("order", ORDERS, ids=["".join(map(str, o)) for o in ORDERS])
def test_any_write_order_one_batch_each_is_one_conversation(
    engine: Engine, make_record: MakeRecord, order: tuple[int, ...]
) -> None:
    records = _records(make_record)
    for i in order:
        write_batch(engine, [records[i]], record_content=True)
    _assert_one_conversation(engine, records)


@pytest.mark.parametrize("order", [(3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_any_order_within_one_batch_is_one_conversation(
    engine: Engine, make_record: MakeRecord, order: tuple[int, ...]
) -> None:
    records = _records(make_record)
    write_batch(engine, [records[i] for i in order], record_content=True)
    _assert_one_conversation(engine, records)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_chat_id_header_any_order_is_one_conversation(
    engine: Engine, make_record: MakeRecord, order: tuple[int, ...]
) -> None:
    """Keyed by the client's chat id, a turn written after a later one adds nothing twice."""
    records = _records(make_record, external_conversation_id="owui-chat-1")
    for i in order:
        write_batch(engine, [records[i]], record_content=True)
    state = _state(engine)
    assert len(state) == 1
    assert state[0]["messages"] == FULL
    assert state[0]["conv"].external_id == "owui-chat-1"
    assert state[0]["reply_requests"] == [r.request_id for r in records]
    assert state[0]["rows"] == {r.request_id for r in records}


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_branch_stays_its_own_conversation_in_any_order(
    engine: Engine, make_record: MakeRecord, order: tuple[int, ...]
) -> None:
    """A regenerated second turn is a second continuation of the first: written in order it becomes a
    conversation of its own, and so it does whatever the order."""
    u2b = {"role": "user", "content": "Actually, Bergen?"}
    records = [
        make_record(key_id="k", request_messages=[U1], response_message=A1),
        make_record(key_id="k", request_messages=[U1, A1, U2], response_message=A3),
        make_record(key_id="k", request_messages=[U1, A1, u2b], response_message=A4),
    ]
    for i in order:
        write_batch(engine, [records[i]], record_content=True)
    lengths = sorted(len(s["messages"]) for s in _state(engine))
    assert lengths == [4, 4], lengths


def test_another_owners_orphan_is_not_adopted(engine: Engine, make_record: MakeRecord) -> None:
    later = make_record(key_id="key_b", request_messages=[U1, A1, U2], response_message=A3)
    first = make_record(key_id="key_a", request_messages=[U1], response_message=A1)
    write_batch(engine, [later], record_content=True)
    write_batch(engine, [first], record_content=True)
    state = _state(engine)
    assert sorted((s["conv"].owner, len(s["messages"])) for s in state) == [("key_a", 2), ("key_b", 4)]


def test_keyed_turn_written_before_the_unkeyed_first_turn_is_one_conversation(
    engine: Engine, make_record: MakeRecord
) -> None:
    """A UI whose first request has no chat id yet (LibreChat's placeholder), the rest have one, and the
    second is written first: the chat id passes to the conversation that adopts it."""
    first = make_record(key_id="k", request_messages=[U1], response_message=A1)
    second = make_record(
        key_id="k", request_messages=[U1, A1, U2], response_message=A3, external_conversation_id="lc-1"
    )
    write_batch(engine, [second], record_content=True)
    write_batch(engine, [first], record_content=True)
    state = _state(engine)
    assert len(state) == 1
    assert state[0]["conv"].external_id == "lc-1"
    assert state[0]["messages"] == [U1, A1, U2, A3]
    assert state[0]["rows"] == {first.request_id, second.request_id}


def test_helper_task_written_before_its_chats_first_turn(engine: Engine, make_record: MakeRecord) -> None:
    """Open WebUI's title task, written before the turn it titles, makes the (empty) conversation the turn
    then fills; the title it got back stays the conversation's title."""
    prompt = "### Task:\nA title for this chat.\n<chat_history>\nUSER: Weather in Oslo?\n</chat_history>"
    title = make_record(
        key_id="k",
        request_messages=[{"role": "user", "content": prompt}],
        response_message={"role": "assistant", "content": '{ "title": "Oslo Weather" }'},
        external_conversation_id="owui-9",
    )
    turn = make_record(
        key_id="k", request_messages=[U1], response_message=A1, external_conversation_id="owui-9"
    )
    other_key = make_record(
        key_id="intruder", request_messages=[U2], response_message=A3, external_conversation_id="owui-9"
    )
    write_batch(engine, [title], record_content=True)
    write_batch(engine, [turn, other_key], record_content=True)
    state = {s["conv"].owner: s for s in _state(engine)}
    assert set(state) == {"k", "intruder"}
    mine = state["k"]
    assert mine["conv"].title == "Oslo Weather"
    assert mine["messages"] == [U1, A1]
    assert mine["rows"] == {title.request_id, turn.request_id}
    assert mine["conv"].total_tokens == 15 + 15  # the helper task counts toward its chat
    assert state["intruder"]["messages"] == [U2, A3]


def test_librechat_title_prompt_and_unknown_tasks_named_by_chat_id_add_no_messages(
    engine: Engine, make_record: MakeRecord
) -> None:
    turn = make_record(
        key_id="k", request_messages=[U1], response_message=A1, external_conversation_id="lc-2"
    )
    custom_task = make_record(  # a custom title prompt of no known form, sent with the chat's id
        key_id="k",
        request_messages=[{"role": "user", "content": "Name this chat:\nUser: Weather in Oslo?"}],
        response_message={"role": "assistant", "content": "Oslo weather"},
        external_conversation_id="lc-2",
    )
    unnamed = make_record(  # LibreChat's default title prompt without a chat id header
        key_id="k",
        request_messages=[
            {
                "role": "user",
                "content": "Analyze this conversation and provide:\n1. ...\nUser: Weather in Oslo?",
            }
        ],
        response_message={"role": "assistant", "content": "Oslo Weather"},
    )
    write_batch(engine, [turn], record_content=True)
    write_batch(engine, [custom_task, unnamed], record_content=True)
    state = _state(engine)
    assert len(state) == 1
    assert state[0]["messages"] == [U1, A1]
    assert state[0]["rows"] == {turn.request_id, custom_task.request_id}


def test_upgrade_fills_the_system_prompt_of_conversations_threaded_before(empty_db_url: str) -> None:
    from llm_backend.db import migrate
    from llm_backend.db.session import make_engine

    migrate.upgrade(empty_db_url, "0001")
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            for cid, first in (("c1", SYSTEM), ("c2", U1), ("c3", None)):
                conn.execute(
                    Conversation.__table__.insert().values(
                        id=cid, created_at=sa.func.now(), updated_at=sa.func.now(), message_count=0
                    )
                )
                if first is not None:
                    conn.execute(
                        Message.__table__.insert().values(
                            conversation_id=cid,
                            position=0,
                            role=first["role"],
                            content=first["content"],
                            created_at=sa.func.now(),
                        )
                    )
        migrate.upgrade(empty_db_url)
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.select(Conversation.id, Conversation.system_prompt)).all())
        assert rows == {"c1": SYSTEM["content"], "c2": None, "c3": None}
    finally:
        engine.dispose()


def test_regenerated_answer_in_a_keyed_chat_adds_only_the_new_answer(
    engine: Engine, make_record: MakeRecord
) -> None:
    again = {"role": "assistant", "content": "Let me look again."}
    records = [
        make_record(key_id="k", request_messages=[U1], response_message=A1, external_conversation_id="c"),
        make_record(key_id="k", request_messages=[U1], response_message=again, external_conversation_id="c"),
    ]
    for record in records:
        write_batch(engine, [record], record_content=True)
    state = _state(engine)
    assert len(state) == 1
    assert state[0]["messages"] == [U1, A1, again]
