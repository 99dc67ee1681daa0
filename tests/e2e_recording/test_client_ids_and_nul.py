"""Through the running app, on SQLite and PostgreSQL: our id names every row whatever id the client sends
(kept, echoed and searchable beside ours), and a NUL in any text a request stores is stored, not refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from openai import OpenAI

from llm_backend.db.models import ApiKey
from llm_backend.db.session import make_engine, session_scope
from tests.e2e_recording.conftest import (
    FakeAzure,
    azure_model,
    conversations,
    mock_model,
    request_rows,
    uvicorn_server,
    wait_for,
)

ADMIN = "adm-" + "z" * 28
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "Say hello"}]}
FFFD = "\ufffd"


def _key(http: httpx.Client, name: str) -> dict[str, str]:
    r = http.post("/admin/keys", json={"name": name}, headers=ADMIN_HEADERS)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}", "id": r.json()["id"]}


def _rejected(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "data").glob("*.rejected") if p.stat().st_size > 0]


def test_one_client_id_five_requests_five_rows(
    db_url: str, app_for: Callable[..., Any], tmp_path: Path
) -> None:
    app = app_for(db_url, [mock_model()], auth="keys", admin_key=ADMIN)
    with uvicorn_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        alice = _key(http, "alice")
        bob = _key(http, "bob")
        auth_a = {"Authorization": alice["Authorization"]}
        auth_b = {"Authorization": bob["Authorization"]}
        ours = []
        for _ in range(5):
            r = http.post("/v1/chat/completions", json=CHAT, headers={**auth_a, "X-Request-Id": "retry-me"})
            assert r.status_code == 200, r.text
            assert r.headers["x-client-request-id"] == "retry-me"
            assert r.headers["x-request-id"].startswith("req_")
            ours.append(r.headers["x-request-id"])
        assert len(set(ours)) == 5
        # bob sends alice's (our) request id as his own: his request is recorded, hers stays hers
        r = http.post("/v1/chat/completions", json=CHAT, headers={**auth_b, "X-Request-Id": ours[0]})
        assert r.status_code == 200 and r.headers["x-request-id"] not in ours
        bobs = r.headers["x-request-id"]
    rows = {r["request_id"]: r for r in request_rows(db_url)}
    assert set(ours) | {bobs} <= set(rows)
    assert all(rows[i]["client_request_id"] == "retry-me" and rows[i]["key_id"] == alice["id"] for i in ours)
    assert rows[bobs]["key_id"] == bob["id"] and rows[bobs]["client_request_id"] == ours[0]
    assert not _rejected(tmp_path)


def test_client_id_headers_sanitized_echoed_and_searchable(
    db_url: str, app_for: Callable[..., Any], tmp_path: Path
) -> None:
    app = app_for(db_url, [mock_model()], auth="keys", admin_key=ADMIN)
    with uvicorn_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        auth = {"Authorization": _key(http, "k")["Authorization"]}
        # OpenAI's header wins over X-Request-Id
        r = http.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={**auth, "X-Client-Request-Id": "trace-1", "X-Request-Id": "proxy-1"},
        )
        assert r.headers["x-client-request-id"] == "trace-1"
        # the Azure SDKs' header is echoed under its own name too
        r = http.post(
            "/v1/chat/completions", json=CHAT, headers={**auth, "x-ms-client-request-id": "azure-trace-2"}
        )
        assert r.headers["x-ms-client-request-id"] == "azure-trace-2"
        assert r.headers["x-client-request-id"] == "azure-trace-2"
        # a tab and non-ASCII bytes are dropped (the server refuses other control bytes in a header itself);
        # the length is bounded as OpenAI bounds it (512)
        r = http.post(
            "/v1/chat/completions",
            json=CHAT,
            headers=[*auth.items(), ("X-Client-Request-Id", b"t\tra\xe9ce-3" + b"x" * 600)],
        )
        assert r.status_code == 200
        assert r.headers["x-client-request-id"] == "trace-3" + "x" * 505
        # the OpenAI SDK passes it along as any extra header
        sdk = OpenAI(base_url=base + "/v1", api_key=auth["Authorization"].split()[1], max_retries=0)
        try:
            raw = sdk.chat.completions.with_raw_response.create(
                model="mock", messages=CHAT["messages"], extra_headers={"X-Client-Request-Id": "sdk-4"}
            )
        finally:
            sdk.close()
        assert raw.headers["x-client-request-id"] == "sdk-4"
        sdk_id = raw.headers["x-request-id"]
        # a refused request keeps it too
        r = http.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": CHAT["messages"]},
            headers={
                **auth,
                "X-Client-Request-Id": "trace-404",
            },
        )
        assert r.status_code == 404 and r.headers["x-client-request-id"] == "trace-404"

        def found(client_id: str) -> list[dict[str, Any]]:
            got = http.get("/admin/requests", params={"client_request_id": client_id}, headers=ADMIN_HEADERS)
            assert got.status_code == 200, got.text
            return got.json()["data"]  # type: ignore[no-any-return]

        wait_for(lambda: len(found("trace-404")) == 1, 20, "the refused request's row")
        assert [(x["request_id"], x["status_code"]) for x in found("sdk-4")] == [(sdk_id, 200)]
        assert found("trace-1")[0]["client_request_id"] == "trace-1" and found("proxy-1") == []
        assert found("azure-trace-2")[0]["object"] == "request"
        assert found("trace-404")[0]["status_code"] == 404 and found("trace-404")[0]["outcome"] == "error"
        usage = http.get(
            "/admin/usage", params={"client_request_id": "sdk-4", "group_by": "model"}, headers=ADMIN_HEADERS
        )
        assert usage.status_code == 200, usage.text
        assert [(u["model"], u["requests"]) for u in usage.json()["data"]] == [("mock", 1)]
    assert not _rejected(tmp_path)


def test_a_nul_in_any_stored_text_is_stored(
    db_url: str, app_for: Callable[..., Any], fake_azure: FakeAzure, tmp_path: Path
) -> None:
    """user, message content (text and parts), a title, a system prompt, a key name and owner, a rename, a
    sessions turn, a tool call id: every request is answered and its row written, nothing is rejected."""
    fake_azure.answer("Hel\x00lo back.")
    app = app_for(db_url, [azure_model(fake_azure.httpserver), mock_model()], auth="keys", admin_key=ADMIN)
    with uvicorn_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/admin/keys", json={"name": "ke\x00y", "owner": "own\x00er"}, headers=ADMIN_HEADERS)
        assert r.status_code == 201, r.text
        key_id = r.json()["id"]
        assert r.json()["name"] == f"ke{FFFD}y"
        auth = {"Authorization": f"Bearer {r.json()['key']}"}
        r = http.patch(f"/admin/keys/{key_id}", json={"name": "re\x00named"}, headers=ADMIN_HEADERS)
        assert r.status_code == 200 and r.json()["name"] == f"re{FFFD}named"

        chat = {
            "model": "gpt-4o",
            "user": "al\x00ice",
            "messages": [
                {"role": "system", "content": "Be \x00 brief"},
                {"role": "user", "content": [{"type": "text", "text": "pa\x00rt"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "Say \x00 hello", "name": "n\x00ame"},
            ],
        }
        r = http.post("/v1/chat/completions", json=chat, headers={**auth, "X-Client-Request-Id": "nul-chat"})
        assert r.status_code == 200, r.text
        chat_id = r.headers["x-request-id"]
        r = http.post(
            "/v1/chat/completions",
            json={"model": "moc\x00k", "messages": CHAT["messages"], "user": "u\x00"},
            headers=auth,
        )
        assert r.status_code == 404  # no such model; the refusal is recorded all the same
        unknown_id = r.headers["x-request-id"]

        r = http.post(
            "/api/conversations",
            json={"title": "Ti\x00tle", "system_prompt": "Sys\x00tem", "model": "mock"},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        assert r.json()["title"] == f"Ti{FFFD}tle"
        r = http.patch(f"/api/conversations/{cid}", json={"title": "Re\x00named"}, headers=auth)
        assert r.status_code == 200 and r.json()["title"] == f"Re{FFFD}named"
        # (let the recorder write what came before: on SQLite a sessions turn racing the recorder's write
        # can fail its lock upgrade, a separate matter from NUL)
        wait_for(lambda: {chat_id, unknown_id} <= {r["request_id"] for r in request_rows(db_url)}, 20, "rows")
        r = http.post(f"/api/conversations/{cid}/messages", json={"content": "Tu\x00rn"}, headers=auth)
        assert r.status_code == 200, r.text
        turn_id = r.headers["x-request-id"]
        got = http.get(f"/api/conversations/{cid}", headers=auth).json()
        assert got["messages"][0]["content"] == f"Tu{FFFD}rn"
        exported = http.get(f"/api/conversations/{cid}/export?format=markdown", headers=auth)
        assert exported.status_code == 200 and f"Sys{FFFD}tem" in exported.text
        listed = http.get("/api/conversations", params={"q": f"Re{FFFD}"}, headers=auth)
        assert [c["id"] for c in listed.json()["data"]] == [cid]

        def rows() -> dict[str, dict[str, Any]]:
            return {r["request_id"]: r for r in request_rows(db_url)}

        wait_for(lambda: {chat_id, unknown_id, turn_id} <= set(rows()), 20, "the rows")
    by_id = rows()
    assert by_id[chat_id]["user"] == f"al{FFFD}ice" and by_id[chat_id]["status_code"] == 200
    assert by_id[unknown_id]["model_requested"] == f"moc{FFFD}k" and by_id[unknown_id]["user"] == f"u{FFFD}"
    assert by_id[turn_id]["conversation_id"] == cid
    threaded = next(c for c in conversations(db_url) if c["id"] == by_id[chat_id]["conversation_id"])
    contents = [m["content"] for m in threaded["messages"]]
    assert contents[0] == f"Be {FFFD} brief"
    assert contents[1] == f"pa{FFFD}rt"  # text-only parts are stored as their text
    assert contents[-2] == f"Say {FFFD} hello" and contents[-1] == f"Hel{FFFD}lo back."
    assert threaded["messages"][-2]["name"] == f"n{FFFD}ame"
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as session:
            key = session.scalars(sa.select(ApiKey).where(ApiKey.id == key_id)).one()
            assert (key.name, key.owner) == (f"re{FFFD}named", f"own{FFFD}er")
    finally:
        engine.dispose()
    assert not _rejected(tmp_path), [p.read_text()[:300] for p in _rejected(tmp_path)]


@pytest.mark.parametrize(
    "url",
    ["/api/conversations/a%00", "/api/conversations?q=%00", "/admin/keys/%00", "/admin/usage?model=%00"],
)
def test_a_nul_in_a_url_is_a_400_on_the_real_database(
    db_url: str, app_for: Callable[..., Any], url: str
) -> None:
    app = app_for(db_url, [mock_model()], auth="keys", admin_key=ADMIN)
    with uvicorn_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.get(url, headers=ADMIN_HEADERS)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_url"
        assert http.get("/readyz").status_code == 200
