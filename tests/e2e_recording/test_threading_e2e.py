"""Automatic threading end to end: chats sent the chatbot-ui way land in one conversation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from llm_backend.db.models import Conversation, Message
from tests.e2e_recording.conftest import (
    MODEL,
    FakeAzure,
    azure_model,
    conversations,
    count_rows,
    request_rows,
    row_by_id,
)

REPLIES = ["Paris is the capital of France.", "About 2.1 million people.", "The Eiffel Tower, the Louvre."]
QUESTIONS = ["What is the capital of France?", "How many people live there?", "What should I see?"]


def _reply_for(body: dict[str, Any]) -> str:
    users = [m for m in body["messages"] if m["role"] == "user"]
    return REPLIES[QUESTIONS.index(users[-1]["content"])] if users[-1]["content"] in QUESTIONS else "Sure."


def _turn(
    c: Any, history: list[dict[str, Any]], rid: str, *, stream: bool, headers: dict[str, str] | None = None
):
    """Send the whole history (a UI does) and return the assistant message as the client assembled it."""
    r = c.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": history, "stream": stream},
        headers={"X-Request-Id": rid, **(headers or {})},
    )
    assert r.status_code == 200, r.text
    if not stream:
        message = r.json()["choices"][0]["message"]
        return {"role": "assistant", "content": message["content"]}
    text = ""
    for line in r.text.split("\n\n"):
        if line.startswith("data: {"):
            text += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return {"role": "assistant", "content": text}


def _setup(fake_azure: FakeAzure) -> None:
    fake_azure.answer(_reply_for)


def test_three_turn_chat_sent_the_chatbot_ui_way_is_one_conversation(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    _setup(fake_azure)
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are a travel guide."}]
    with app.test_client() as c:
        for i, question in enumerate(QUESTIONS):
            history.append({"role": "user", "content": question})
            # turn 2 is streamed: a UI may switch, the thread must not break
            history.append(_turn(c, history, f"rid-turn-{i}", stream=i == 1))
        # another chat that starts the same way but diverges is not part of the first one
        _turn(c, [{"role": "user", "content": "Tell me a joke"}], "rid-other", stream=False)
    convs = conversations(db_url)
    assert len(convs) == 2, convs
    main = next(cv for cv in convs if cv["message_count"] == 7)
    assert [(m["role"], m["content"]) for m in main["messages"]] == [
        (m["role"], m["content"]) for m in history
    ]
    assert [m["position"] for m in main["messages"]] == list(range(7))
    # each stored assistant reply points at the request that produced it
    turn_rows = [row_by_id(db_url, f"rid-turn-{i}") for i in range(3)]
    assert [m["request_id"] for m in main["messages"] if m["role"] == "assistant"] == [
        r["request_id"] for r in turn_rows
    ]
    assert main["title"] == QUESTIONS[0]
    assert main["model"] == MODEL
    assert {r["conversation_id"] for r in turn_rows} == {main["id"]}
    assert main["total_tokens"] == sum(r["total_tokens"] for r in turn_rows)
    assert row_by_id(db_url, "rid-other")["conversation_id"] not in (None, main["id"])


def test_explicit_conversation_id_header_wins(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    _setup(fake_azure)
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        history: list[dict[str, Any]] = [{"role": "user", "content": QUESTIONS[0]}]
        history.append(_turn(c, history, "rid-h-0", stream=False))
        history.append({"role": "user", "content": QUESTIONS[1]})
        # this would continue the first conversation by its transcript; the header says otherwise
        _turn(c, history, "rid-h-1", stream=False, headers={"X-Conversation-Id": "conv-explicit-1"})
        # the header also threads later turns into that conversation
        _turn(
            c,
            [{"role": "user", "content": QUESTIONS[2]}],
            "rid-h-2",
            stream=True,
            headers={"X-Conversation-Id": "conv-explicit-1"},
        )
    first = row_by_id(db_url, "rid-h-0")["conversation_id"]
    assert first and first != "conv-explicit-1"
    assert row_by_id(db_url, "rid-h-1")["conversation_id"] == "conv-explicit-1"
    assert row_by_id(db_url, "rid-h-2")["conversation_id"] == "conv-explicit-1"
    convs = {cv["id"]: cv for cv in conversations(db_url)}
    assert set(convs) == {first, "conv-explicit-1"}
    assert [m["content"] for m in convs[first]["messages"]] == [QUESTIONS[0], REPLIES[0]]
    explicit = [m["content"] for m in convs["conv-explicit-1"]["messages"]]
    assert explicit == [QUESTIONS[0], REPLIES[0], QUESTIONS[1], REPLIES[1], QUESTIONS[2], REPLIES[2]]


def test_record_content_off_records_usage_but_no_conversations(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    _setup(fake_azure)
    app = app_for(db_url, [azure_model(fake_azure.httpserver)], record_content=False)
    with app.test_client() as c:
        history: list[dict[str, Any]] = []
        for i, question in enumerate(QUESTIONS):
            history.append({"role": "user", "content": question})
            history.append(_turn(c, history, f"rid-nc-{i}", stream=i == 2))
    rows = request_rows(db_url)
    assert sorted(r["client_request_id"] for r in rows) == ["rid-nc-0", "rid-nc-1", "rid-nc-2"]
    assert all(r["total_tokens"] > 0 and r["outcome"] == "ok" for r in rows)
    assert all(r["conversation_id"] is None for r in rows)
    assert count_rows(db_url, Conversation) == 0
    assert count_rows(db_url, Message) == 0
