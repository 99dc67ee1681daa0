"""Conversations as chat UIs make them: the list a user sees matches the chats in their UI.

Open WebUI sends, besides each turn, helper tasks per chat (a title, tags, follow-up suggestions; non-streamed
prompts that open with "### Task:" and quote the chat) and, with ENABLE_FORWARD_USER_INFO_HEADERS, the chat's
id in X-OpenWebUI-Chat-Id. LibreChat can send its conversation id in a header of one's choosing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import openai

from llm_backend.db.models import RequestLog
from tests.e2e_recording.conftest import (
    MODEL,
    FakeAzure,
    azure_model,
    conversations,
    count_rows,
    request_rows,
    wait_for,
)

ADMIN = {"Authorization": "Bearer adm"}
TITLE = "🗼 Paris Trip Planning"


def _task(kind: str, history: list[dict[str, Any]]) -> str:
    """A helper prompt of the shape Open WebUI's task templates have (the wording here is ours)."""
    quoted = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in history[-6:])
    asks = {
        "title": 'Write a short title, with an emoji, for the chat below.\n### Output:\n{ "title": "..." }',
        "tags": 'Give 1-3 broad tags for the chat below.\n### Output:\n{ "tags": ["..."] }',
        "follow_ups": 'Suggest follow-up questions.\n### Output:\n{ "follow_ups": ["..."] }',
    }[kind]
    return f"### Task:\n{asks}\n### Chat History:\n<chat_history>\n{quoted}\n</chat_history>"


def _answer(body: dict[str, Any]) -> str:
    last = body["messages"][-1]["content"]
    if last.startswith("### Task:"):
        if '"title"' in last:
            return json.dumps({"title": TITLE})
        if '"tags"' in last:
            return json.dumps({"tags": ["Travel"]})
        return json.dumps({"follow_ups": ["What about museums?"]})
    return f"About {last.lower().rstrip('?')}: gladly."


class UI:
    """A chat UI on the openai SDK: resends the whole history each turn, runs its helper tasks after."""

    def __init__(self, c: Any, key: str = "unused", chat_header: str | None = "X-OpenWebUI-Chat-Id") -> None:
        self.sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=c, max_retries=0)
        self.chat_header = chat_header
        self.requests = 0

    def _headers(self, chat_id: str | None) -> dict[str, str]:
        return {self.chat_header: chat_id} if self.chat_header and chat_id else {}

    def turn(self, history: list[dict[str, Any]], text: str, chat_id: str | None, *, stream: bool) -> None:
        history.append({"role": "user", "content": text})
        self.requests += 1
        if stream:
            chunks = self.sdk.chat.completions.create(
                model=MODEL,
                messages=history,
                stream=True,
                extra_headers=self._headers(chat_id),  # type: ignore[arg-type]
            )
            content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            answer = self.sdk.chat.completions.create(
                model=MODEL,
                messages=history,
                extra_headers=self._headers(chat_id),  # type: ignore[arg-type]
            )
            content = answer.choices[0].message.content or ""
        history.append({"role": "assistant", "content": content})

    def task(self, kind: str, history: list[dict[str, Any]], chat_id: str | None) -> str:
        self.requests += 1
        answer = self.sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": _task(kind, history)}],
            extra_headers=self._headers(chat_id),
        )
        return answer.choices[0].message.content or ""


def _key(c: Any, name: str) -> tuple[str, str]:
    r = c.post("/admin/keys", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def _list(c: Any, secret: str, **params: Any) -> list[dict[str, Any]]:
    r = c.get("/api/conversations", params=params, headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def test_open_webui_chats_with_the_chat_id_header_are_the_ui_chats(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.answer(_answer)
    app = app_for(db_url, [azure_model(fake_azure.httpserver)], auth="keys", admin_key="adm")
    with app.test_client() as c:
        a_id, a_key = _key(c, "open-webui")
        b_id, b_key = _key(c, "someone-else")
        ui = UI(c, a_key)
        paris: list[dict[str, Any]] = []
        ui.turn(paris, "What should I see in Paris?", "chat-paris", stream=True)
        assert ui.task("title", paris, "chat-paris") == json.dumps({"title": TITLE})
        ui.task("tags", paris, "chat-paris")
        ui.task("follow_ups", paris, "chat-paris")
        ui.turn(paris, "And where should I eat?", "chat-paris", stream=False)
        ui.task("follow_ups", paris, "chat-paris")
        rome: list[dict[str, Any]] = []
        ui.turn(rome, "Is Rome hot in July?", "chat-rome", stream=False)
        ui.task("title", rome, "chat-rome")

        # another key sending the same chat id writes into a chat of its own, never into A's
        intruder = UI(c, b_key)
        theirs: list[dict[str, Any]] = []
        intruder.turn(theirs, "Overwrite their chat", "chat-paris", stream=False)

        wait_for(lambda: count_rows(db_url, RequestLog) >= ui.requests + intruder.requests, 15, "recorded")
        listed = _list(c, a_key)
        assert sorted(cv["title"] for cv in listed) == sorted([TITLE, TITLE])  # as the UI titled them
        assert len(listed) == 2
        assert [cv["id"] for cv in _list(c, b_key)] != [cv["id"] for cv in listed]
        assert len(_list(c, b_key)) == 1

    convs = {(cv["owner"], cv["external_id"]): cv for cv in conversations(db_url)}
    assert set(convs) == {(a_id, "chat-paris"), (a_id, "chat-rome"), (b_id, "chat-paris")}
    for history, key in (
        (paris, (a_id, "chat-paris")),
        (rome, (a_id, "chat-rome")),
        (theirs, (b_id, "chat-paris")),
    ):
        stored = convs[key]["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [(m["role"], m["content"]) for m in history]
    assert not any("### Task" in str(m["content"]) for cv in convs.values() for m in cv["messages"])

    # every request of a chat, helpers included, is filed under that chat; its usage adds up
    rows = request_rows(db_url)
    for cv in convs.values():
        mine = [r for r in rows if r["conversation_id"] == cv["id"]]
        assert cv["total_tokens"] == sum(r["total_tokens"] for r in mine)
    assert len([r for r in rows if r["conversation_id"] == convs[(a_id, "chat-paris")]["id"]]) == 6
    assert len([r for r in rows if r["conversation_id"] == convs[(a_id, "chat-rome")]["id"]]) == 2
    assert all(r["conversation_id"] for r in rows if r["route"] == "/v1/chat/completions")


def test_helper_tasks_without_a_chat_id_are_requests_without_a_conversation(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.answer(_answer)
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        ui = UI(c, chat_header=None)  # ENABLE_FORWARD_USER_INFO_HEADERS off
        history: list[dict[str, Any]] = []
        ui.turn(history, "What should I see in Paris?", None, stream=False)
        ui.task("title", history, None)
        ui.task("tags", history, None)
        ui.task("follow_ups", history, None)
        ui.turn(history, "And where should I eat?", None, stream=True)
        ui.task("follow_ups", history, None)
    convs = conversations(db_url)
    assert len(convs) == 1, [cv["title"] for cv in convs]
    assert [(m["role"], m["content"]) for m in convs[0]["messages"]] == [
        (m["role"], m["content"]) for m in history
    ]
    assert convs[0]["title"] == "What should I see in Paris?"
    rows = request_rows(db_url)
    helpers = [r for r in rows if r["conversation_id"] is None]
    assert len(rows) == 6 and len(helpers) == 4


def test_a_chat_id_header_of_ones_choosing_librechat_style(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    """librechat.yaml: headers: {X-LibreChat-Conversation-Id: "{{LIBRECHAT_BODY_CONVERSATIONID}}"}. A first
    turn may come with no id yet (empty, or a placeholder such as "new"); the id's later turns adopt it."""
    fake_azure.answer(_answer)
    app = app_for(
        db_url,
        [azure_model(fake_azure.httpserver)],
        conversation_id_headers=("X-Conversation-Id", "X-LibreChat-Conversation-Id"),
    )
    with app.test_client() as c:
        ui = UI(c, chat_header="X-LibreChat-Conversation-Id")
        history: list[dict[str, Any]] = []
        ui.turn(history, "Plan a week in Japan", "new", stream=False)
        wait_for(lambda: count_rows(db_url, RequestLog) >= 1, 15, "first turn recorded")
        ui.turn(history, "Add Kyoto", "lc-7f3a", stream=True)
        ui.turn(history, "And Osaka", "lc-7f3a", stream=False)
        # X-OpenWebUI-Chat-Id is not in this deployment's list: it names nothing
        other: list[dict[str, Any]] = []
        UI(c, chat_header="X-OpenWebUI-Chat-Id").turn(other, "Unrelated", "lc-7f3a", stream=False)
    convs = conversations(db_url)
    assert sorted((cv["external_id"] or "", cv["message_count"]) for cv in convs) == [("", 2), ("lc-7f3a", 6)]
    main = next(cv for cv in convs if cv["external_id"])
    assert [m["content"] for m in main["messages"]] == [m["content"] for m in history]


def test_threaded_conversation_keeps_its_system_prompt_and_continues_with_it_once(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.answer(_answer)
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        ui = UI(c, chat_header=None)
        history: list[dict[str, Any]] = [{"role": "system", "content": "You are a travel guide."}]
        ui.turn(history, "Lisbon in a day?", None, stream=False)
        ui.turn(history, "And at night?", None, stream=False)
        wait_for(lambda: bool(conversations(db_url)) and conversations(db_url)[0]["message_count"] == 5, 15)
        conv = c.get("/api/conversations").json()["data"][0]
        assert conv["system_prompt"] == "You are a travel guide."
        turn = c.post(f"/api/conversations/{conv['id']}/messages", json={"content": "Any day trips?"})
        assert turn.status_code == 200, turn.text
    sent = fake_azure.bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_model_filter_finds_conversations_recorded_under_the_alias_canonical_name(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.answer(_answer)
    model = dataclasses.replace(azure_model(fake_azure.httpserver), aliases=("gpt-4",))
    app = app_for(db_url, [model])
    with app.test_client() as c:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c, max_retries=0)
        sdk.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi via the alias"}])
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi by name"}])
        wait_for(lambda: len(conversations(db_url)) == 2, 15, "two conversations")
        for name in ("gpt-4", MODEL):
            found = c.get("/api/conversations", params={"model": name}).json()["data"]
            assert sorted(cv["title"] for cv in found) == ["Hi by name", "Hi via the alias"], name
            assert {cv["model"] for cv in found} == {MODEL}
        assert c.get("/api/conversations", params={"model": "gpt-3.5"}).json()["data"] == []


def test_conversation_id_headers_setting() -> None:
    from llm_backend.config import Settings

    base = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    assert Settings.from_env(base).conversation_id_headers == ("X-Conversation-Id", "X-OpenWebUI-Chat-Id")
    custom = Settings.from_env(
        {**base, "CONVERSATION_ID_HEADERS": "X-LibreChat-Conversation-Id, X-Conversation-Id"}
    )
    assert custom.conversation_id_headers == ("X-LibreChat-Conversation-Id", "X-Conversation-Id")
    assert Settings.from_env({**base, "CONVERSATION_ID_HEADERS": ""}).conversation_id_headers == ()
