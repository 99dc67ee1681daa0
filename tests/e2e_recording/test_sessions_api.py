"""The sessions API (/api/conversations) end to end over HTTP, against a fake Azure upstream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from llm_backend.db.models import Conversation
from llm_backend.services.conversations import TITLE_PROMPT
from tests.e2e_recording.conftest import (
    MODEL,
    FakeAzure,
    assert_openai_error,
    azure_model,
    count_rows,
    mock_model,
    row_by_id,
)

SYSTEM = "You are a terse travel agent."


def _sse_text(raw: str) -> str:
    text = ""
    assert raw.rstrip().endswith("data: [DONE]"), raw[-200:]
    for line in raw.split("\n\n"):
        if line.startswith("data: {"):
            event = orjson.loads(line[6:])
            assert event["choices"], event  # no empty-choices chunk reaches the client
            text += event["choices"][0]["delta"].get("content") or ""
    return text


def test_conversation_lifecycle(db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure) -> None:
    answers = {
        "Plan a weekend in Rome.": "Day one: the Colosseum.",
        "And day two?": "The Vatican museums.",
    }

    def content(body: dict[str, Any]) -> str:
        if body["messages"][0]["content"] == TITLE_PROMPT:
            return '"Trip Planning."'
        return answers[body["messages"][-1]["content"]]

    fake_azure.answer(content, {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26})
    app = app_for(db_url, [azure_model(fake_azure.httpserver)])
    with app.test_client() as c:
        created = c.post(
            "/api/conversations", json={"title": "Rome", "model": MODEL, "system_prompt": SYSTEM}
        )
        assert created.status_code == 201, created.text
        conv = created.json()
        cid = conv["id"]
        assert conv["object"] == "conversation"
        assert (conv["title"], conv["model"], conv["system_prompt"]) == ("Rome", MODEL, SYSTEM)
        assert conv["messages"] == [] and conv["message_count"] == 0

        # a non-streamed turn: the upstream gets the system prompt and the new message
        turn = c.post(
            f"/api/conversations/{cid}/messages",
            json={"content": "Plan a weekend in Rome."},
            headers={"X-Request-Id": "rid-turn-1"},
        )
        assert turn.status_code == 200, turn.text
        t = turn.json()
        assert t["object"] == "conversation.turn" and t["conversation_id"] == cid
        assert t["request_id"] == turn.headers["x-request-id"] and t["request_id"].startswith("req_")
        assert turn.headers["x-client-request-id"] == "rid-turn-1"
        assert t["message"] == {"role": "assistant", "content": "Day one: the Colosseum."}
        assert t["usage"]["total_tokens"] == 26
        assert fake_azure.bodies[-1]["messages"] == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Plan a weekend in Rome."},
        ]
        assert fake_azure.bodies[-1]["model"] == MODEL
        assert "stream" not in fake_azure.bodies[-1]

        # a streamed turn: the upstream gets the whole history; the reply is stored once the stream ends
        streamed = c.post(
            f"/api/conversations/{cid}/messages",
            json={"content": "And day two?", "stream": True, "temperature": 0.3},
            headers={"X-Request-Id": "rid-turn-2"},
        )
        assert streamed.status_code == 200, streamed.text
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert _sse_text(streamed.text) == "The Vatican museums."
        sent = fake_azure.bodies[-1]
        assert sent["messages"] == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Plan a weekend in Rome."},
            {"role": "assistant", "content": "Day one: the Colosseum."},
            {"role": "user", "content": "And day two?"},
        ]
        assert sent["stream"] is True and sent["temperature"] == 0.3

        got = c.get(f"/api/conversations/{cid}")
        assert got.status_code == 200
        full = got.json()
        assert [(m["role"], m["content"], m["position"]) for m in full["messages"]] == [
            ("user", "Plan a weekend in Rome.", 0),
            ("assistant", "Day one: the Colosseum.", 1),
            ("user", "And day two?", 2),
            ("assistant", "The Vatican museums.", 3),
        ]
        ours = [turn.headers["x-request-id"], streamed.headers["x-request-id"]]
        assert [m["request_id"] for m in full["messages"]] == [ours[0]] * 2 + [ours[1]] * 2
        assert full["message_count"] == 4
        assert full["usage"]["total_tokens"] == 52
        assert full["title"] == "Rome"

        renamed = c.patch(f"/api/conversations/{cid}", json={"title": "Roma"})
        assert renamed.status_code == 200 and renamed.json()["title"] == "Roma"
        assert c.get(f"/api/conversations/{cid}").json()["title"] == "Roma"

        titled = c.post(f"/api/conversations/{cid}/title", json={})
        assert titled.status_code == 200, titled.text
        assert titled.json()["title"] == "Trip Planning"
        title_request = fake_azure.bodies[-1]
        assert title_request["messages"][0] == {"role": "system", "content": TITLE_PROMPT}
        assert "Plan a weekend in Rome." in title_request["messages"][1]["content"]
        assert c.get(f"/api/conversations/{cid}").json()["title"] == "Trip Planning"

        exported = c.get(f"/api/conversations/{cid}/export", params={"format": "json"})
        assert exported.status_code == 200
        assert exported.headers["content-type"].startswith("application/json")
        assert f"conversation-{cid}.json" in exported.headers["content-disposition"]
        doc = json.loads(exported.text)
        assert doc["id"] == cid and doc["title"] == "Trip Planning" and len(doc["messages"]) == 4
        assert doc["system_prompt"] == SYSTEM

        md = c.get(f"/api/conversations/{cid}/export", params={"format": "markdown"})
        assert md.status_code == 200
        assert md.headers["content-type"].startswith("text/markdown")
        assert f"conversation-{cid}.md" in md.headers["content-disposition"]
        text = md.text
        assert text.startswith("# Trip Planning")
        for piece in (
            "## System",
            SYSTEM,
            "## User",
            "Plan a weekend in Rome.",
            "## Assistant",
            "The Vatican museums.",
        ):
            assert piece in text, piece
        assert (
            text.index("Plan a weekend")
            < text.index("Day one")
            < text.index("And day two")
            < text.index("Vatican")
        )

        bad_format = c.get(f"/api/conversations/{cid}/export", params={"format": "pdf"})
        assert_openai_error(bad_format, 400)

        # the turns are in the usage log, tied to the conversation, without a second (threaded) copy
        assert count_rows(db_url, Conversation) == 1

        deleted = c.delete(f"/api/conversations/{cid}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": cid, "object": "conversation.deleted", "deleted": True}
        assert_openai_error(c.get(f"/api/conversations/{cid}"), 404, "not_found")
        assert_openai_error(c.delete(f"/api/conversations/{cid}"), 404, "not_found")
        assert_openai_error(c.get(f"/api/conversations/{cid}/export"), 404, "not_found")
    for rid in ("rid-turn-1", "rid-turn-2"):
        row = row_by_id(db_url, rid)
        assert row["conversation_id"] == cid
        assert row["outcome"] == "ok" and row["total_tokens"] == 26 and row["tokens_estimated"] is False
        assert row["route"] == f"/api/conversations/{cid}/messages"
    assert row_by_id(db_url, "rid-turn-2")["stream"] is True
    assert count_rows(db_url, Conversation) == 0


def test_list_filters_and_cursor_pagination(db_url: str, app_for: Callable[..., Any]) -> None:
    app = app_for(db_url, [mock_model("mock-a"), mock_model("mock-b")])
    with app.test_client() as c:
        made: list[dict[str, Any]] = []
        for i in range(25):
            body = {
                "title": f"{'Alpha' if i % 3 == 0 else 'beta'} trip {i}",
                "model": "mock-b" if i % 2 else "mock-a",
            }
            r = c.post("/api/conversations", json=body)
            assert r.status_code == 201, r.text
            made.append(r.json())
            if i == 9:
                time.sleep(0.05)  # a clear gap in created_at
        ids = [m["id"] for m in made]

        first = c.get("/api/conversations")
        assert first.status_code == 200
        page = first.json()
        assert page["object"] == "list"
        assert len(page["data"]) == 20 and page["has_more"] is True and page["next_cursor"]
        second = c.get("/api/conversations", params={"cursor": page["next_cursor"]}).json()
        assert len(second["data"]) == 5 and second["has_more"] is False and second["next_cursor"] is None
        listed = [cv["id"] for cv in page["data"] + second["data"]]
        assert sorted(listed) == sorted(ids) and len(set(listed)) == 25
        # most recently updated first
        stamps = [cv["updated_at"] for cv in page["data"] + second["data"]]
        assert stamps == sorted(stamps, reverse=True)

        # small pages walk the whole list without gaps or repeats
        seen: list[str] = []
        cursor = None
        for _ in range(10):
            params: dict[str, Any] = {"limit": 7}
            if cursor:
                params["cursor"] = cursor
            p = c.get("/api/conversations", params=params).json()
            seen += [cv["id"] for cv in p["data"]]
            cursor = p["next_cursor"]
            if not cursor:
                break
        assert seen == listed

        by_model = c.get("/api/conversations", params={"model": "mock-b", "limit": 100}).json()["data"]
        assert sorted(cv["id"] for cv in by_model) == sorted(m["id"] for m in made if m["model"] == "mock-b")

        alpha = c.get("/api/conversations", params={"q": "ALPHA", "limit": 100}).json()["data"]
        assert sorted(cv["title"] for cv in alpha) == sorted(
            m["title"] for m in made if m["title"].startswith("Alpha")
        )
        both = c.get("/api/conversations", params={"q": "trip 1", "model": "mock-a", "limit": 100}).json()[
            "data"
        ]
        expected = {m["id"] for m in made if "trip 1" in m["title"] and m["model"] == "mock-a"}
        assert {cv["id"] for cv in both} == expected and expected
        assert c.get("/api/conversations", params={"q": "100%_"}).json()["data"] == []

        after = c.get(
            "/api/conversations", params={"created_after": made[10]["created_at"], "limit": 100}
        ).json()
        assert sorted(cv["id"] for cv in after["data"]) == sorted(ids[10:])
        before = c.get(
            "/api/conversations", params={"created_before": made[10]["created_at"], "limit": 100}
        ).json()
        assert sorted(cv["id"] for cv in before["data"]) == sorted(ids[:10])

        assert_openai_error(c.get("/api/conversations", params={"cursor": "not-a-cursor"}), 400)
        err = assert_openai_error(c.get("/api/conversations", params={"cursor": "!!!"}), 400)
        assert err["param"] == "cursor"
        assert_openai_error(c.get("/api/conversations", params={"created_after": "yesterday"}), 400)
        assert_openai_error(c.get("/api/conversations", params={"limit": 0}), 400)


def test_errors_are_openai_shaped(db_url: str, app_for: Callable[..., Any]) -> None:
    app = app_for(db_url, [mock_model()])
    with app.test_client() as c:
        missing = "0190aaaa-0000-7000-8000-000000000000"
        for method, path, body in (
            ("GET", f"/api/conversations/{missing}", None),
            ("PATCH", f"/api/conversations/{missing}", {"title": "x"}),
            ("DELETE", f"/api/conversations/{missing}", None),
            ("POST", f"/api/conversations/{missing}/messages", {"content": "hi", "model": "mock"}),
            ("POST", f"/api/conversations/{missing}/title", {"model": "mock"}),
            ("GET", f"/api/conversations/{missing}/export", None),
        ):
            r = c.request(method, path, json=body)
            err = assert_openai_error(r, 404, "not_found")
            assert missing in err["message"], (method, path)

        no_model = c.post("/api/conversations", json={"title": "no model"}).json()
        err = assert_openai_error(
            c.post(f"/api/conversations/{no_model['id']}/messages", json={"content": "hi"}), 400
        )
        assert err["param"] == "model"
        err = assert_openai_error(c.post(f"/api/conversations/{no_model['id']}/title", json={}), 400)
        assert err["param"] == "model"
        # a model given with the turn works, and is stored
        ok = c.post(f"/api/conversations/{no_model['id']}/messages", json={"content": "hi", "model": "mock"})
        assert ok.status_code == 200, ok.text
        assert c.get(f"/api/conversations/{no_model['id']}").json()["message_count"] == 2

        assert_openai_error(
            c.post("/api/conversations", json={"model": "no-such-model"}), 404, "model_not_found"
        )
        assert_openai_error(c.post("/api/conversations", json={"title": "x", "colour": "red"}), 400)
        assert_openai_error(c.post(f"/api/conversations/{no_model['id']}/messages", json={}), 400)
        assert_openai_error(c.patch(f"/api/conversations/{no_model['id']}", json={"title": ""}), 400)
        empty = c.post("/api/conversations", json={"model": "mock"}).json()
        assert_openai_error(c.post(f"/api/conversations/{empty['id']}/title", json={}), 400)
