"""Per-key isolation of the sessions API: a key sees and touches only its own conversations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.e2e_recording.conftest import assert_openai_error, conversations, mock_model, request_rows

ADMIN = {"Authorization": "Bearer adm"}


def _key(c: Any, name: str) -> tuple[str, dict[str, str]]:
    r = c.post("/admin/keys", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    data = r.json()
    return data["id"], {"Authorization": f"Bearer {data['key']}"}


def test_keys_see_only_their_own_conversations(db_url: str, app_for: Callable[..., Any]) -> None:
    app = app_for(db_url, [mock_model()], auth="keys", admin_key="adm")
    with app.test_client() as c:
        a_id, a = _key(c, "team-a")
        b_id, b = _key(c, "team-b")
        assert_openai_error(c.get("/api/conversations"), 401)

        conv_a = c.post("/api/conversations", json={"title": "A's plans", "model": "mock"}, headers=a).json()
        conv_b = c.post(
            "/api/conversations", json={"title": "B's secrets", "model": "mock"}, headers=b
        ).json()
        assert conv_a["owner"] == a_id and conv_b["owner"] == b_id
        turn = c.post(f"/api/conversations/{conv_b['id']}/messages", json={"content": "secret"}, headers=b)
        assert turn.status_code == 200, turn.text
        bid = conv_b["id"]

        # A cannot see, rename, delete, continue, title or export B's conversation: it does not exist for A
        for method, path, body in (
            ("GET", f"/api/conversations/{bid}", None),
            ("PATCH", f"/api/conversations/{bid}", {"title": "mine now"}),
            ("DELETE", f"/api/conversations/{bid}", None),
            ("POST", f"/api/conversations/{bid}/messages", {"content": "let me in"}),
            ("POST", f"/api/conversations/{bid}/title", {}),
            ("GET", f"/api/conversations/{bid}/export", None),
        ):
            assert_openai_error(c.request(method, path, json=body, headers=a), 404, "not_found")

        # the list shows only one's own, even when asking for another owner
        assert [cv["id"] for cv in c.get("/api/conversations", headers=a).json()["data"]] == [conv_a["id"]]
        assert [cv["id"] for cv in c.get("/api/conversations", headers=b).json()["data"]] == [bid]
        leak = c.get("/api/conversations", params={"owner": b_id}, headers=a).json()["data"]
        assert [cv["id"] for cv in leak] == [conv_a["id"]]

        # B's conversation is untouched
        mine = c.get(f"/api/conversations/{bid}", headers=b).json()
        assert mine["title"] == "B's secrets" and mine["message_count"] == 2

        # the admin key sees all, and may filter by owner
        everything = c.get("/api/conversations", headers=ADMIN).json()["data"]
        assert {cv["id"] for cv in everything} == {conv_a["id"], bid}
        only_b = c.get("/api/conversations", params={"owner": b_id}, headers=ADMIN).json()["data"]
        assert [cv["id"] for cv in only_b] == [bid]
        assert c.get(f"/api/conversations/{bid}", headers=ADMIN).status_code == 200

        # and the owner can still delete it
        assert c.delete(f"/api/conversations/{bid}", headers=b).status_code == 200
        assert_openai_error(c.get(f"/api/conversations/{bid}", headers=ADMIN), 404, "not_found")
    # the turn B made is in the usage log under B's key
    turns = [r for r in request_rows(db_url) if r["route"].endswith("/messages") and r["status_code"] == 200]
    assert [(r["key_id"], r["conversation_id"]) for r in turns] == [(b_id, bid)]


def test_threading_never_crosses_keys(db_url: str, app_for: Callable[..., Any]) -> None:
    app = app_for(db_url, [mock_model()], auth="keys", admin_key="adm")
    with app.test_client() as c:
        a_id, a = _key(c, "team-a")
        b_id, b = _key(c, "team-b")
        conv_b = c.post("/api/conversations", json={"title": "B's", "model": "mock"}, headers=b).json()
        assert c.post(
            f"/api/conversations/{conv_b['id']}/messages", json={"content": "hi"}, headers=b
        ).is_success

        def chat(headers: dict[str, str], messages: list[dict[str, Any]], rid: str, **extra: str) -> Any:
            r = c.post(
                "/v1/chat/completions",
                json={"model": "mock", "messages": messages},
                headers={**headers, "X-Request-Id": rid, **extra},
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        # both keys send the same chat, the chatbot-ui way: each gets its own conversation
        first = [{"role": "user", "content": "Same question"}]
        reply = chat(a, first, "a-1")
        assert chat(b, first, "b-1") == reply
        second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Follow-up"}]
        chat(a, second, "a-2")
        chat(b, second, "b-2")
        # A names B's conversation explicitly: it is not A's, so A's turn does not go there
        chat(a, [{"role": "user", "content": "let me in"}], "a-3", **{"X-Conversation-Id": conv_b["id"]})

    # (the recorder writes behind: read after the app stopped and drained it)
    convs = conversations(db_url)
    mine_b = next(cv for cv in convs if cv["id"] == conv_b["id"])
    assert [m["content"] for m in mine_b["messages"]][:1] == ["hi"] and mine_b["message_count"] == 2
    assert sorted(cv["message_count"] for cv in convs if cv["owner"] == a_id) == [2, 4]
    assert sorted(cv["message_count"] for cv in convs if cv["owner"] == b_id) == [2, 4]
    assert {cv["owner"] for cv in convs} == {a_id, b_id}
    rows = {r["client_request_id"]: r for r in request_rows(db_url)}
    assert rows["a-1"]["conversation_id"] == rows["a-2"]["conversation_id"]
    assert rows["b-1"]["conversation_id"] == rows["b-2"]["conversation_id"]
    assert rows["a-1"]["conversation_id"] != rows["b-1"]["conversation_id"]
    assert rows["a-3"]["conversation_id"] not in (None, conv_b["id"])
    assert (rows["a-1"]["key_id"], rows["b-1"]["key_id"]) == (a_id, b_id)
