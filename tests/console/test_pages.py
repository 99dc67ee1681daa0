"""Console pages over plain HTTP: editing, enabling and deleting keys, spend with prices, exports, and what
hostile filters get (a page that says what is wrong, never a stack trace)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from llm_backend.config import Prices
from tests.conftest import mock_model
from tests.console.conftest import ADMIN_KEY, csrf_of, sign_in

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _keys(client: Any) -> list[dict[str, Any]]:
    return client.get("/admin/keys", headers=ADMIN).json()["data"]  # type: ignore[no-any-return]


def test_edit_enable_and_delete_a_key(console_client: Callable[..., Any]) -> None:
    client = console_client()
    sign_in(client)
    token = csrf_of(client.get("/console/keys").text)
    assert client.post("/console/keys", data={"name": "orig", "csrf_token": token}).status_code == 201
    key_id = _keys(client)[0]["id"]
    edit = client.get(f"/console/keys/{key_id}")
    assert edit.status_code == 200 and 'value="orig"' in edit.text
    saved = client.post(
        f"/console/keys/{key_id}",
        data={
            "csrf_token": token,
            "name": "renamed",
            "owner": "team-b",
            "models": "mock, other",
            "allowed_ips": "10.0.0.0/8 192.168.1.7",
            "rpm": "60",
            "tpm": "",
            "daily_tokens": "1_000",
            "monthly_tokens": "20,000",
            "expires_at": "2030-01-02T03:04",
            "enabled": "on",
        },
        follow_redirects=False,
    )
    assert saved.status_code == 303, saved.text
    key = _keys(client)[0]
    assert (key["name"], key["owner"], key["models"], key["rpm"], key["tpm"]) == (
        "renamed",
        "team-b",
        ["mock", "other"],
        60,
        None,
    )
    assert key["allowed_ips"] == ["10.0.0.0/8", "192.168.1.7/32"]
    assert (key["daily_tokens"], key["monthly_tokens"]) == (1000, 20000)
    assert key["expires_at"].startswith("2030-01-02T03:04") and key["enabled"] is True
    listing = client.get("/console/keys").text
    assert "1,000 / 20,000" in listing  # the budget left, nothing used yet
    # a bad value: the form again, saying which field, and nothing changed
    bad = client.post(f"/console/keys/{key_id}", data={"csrf_token": token, "name": "x", "rpm": "ten"})
    assert bad.status_code == 400 and "&#39;rpm&#39; must be a whole number" in bad.text
    bad = client.post(
        f"/console/keys/{key_id}", data={"csrf_token": token, "name": "x", "allowed_ips": "nope"}
    )
    assert bad.status_code == 400 and "allowed_ips" in bad.text
    assert _keys(client)[0]["name"] == "renamed"
    # unchecking "enabled" disables; the buttons enable and delete
    client.post(f"/console/keys/{key_id}", data={"csrf_token": token, "name": "renamed"})
    assert _keys(client)[0]["enabled"] is False
    assert client.post(f"/console/keys/{key_id}/enable", data={"csrf_token": token}).status_code == 200
    assert _keys(client)[0]["enabled"] is True
    gone = client.post(f"/console/keys/{key_id}/delete", data={"csrf_token": token}, follow_redirects=False)
    assert gone.status_code == 303 and _keys(client) == []
    missing = client.post(f"/console/keys/{key_id}/disable", data={"csrf_token": token})
    assert missing.status_code == 404 and "No API key" in missing.text
    assert client.get("/console/keys/key_nope").status_code == 404


def test_spend_export_and_hostile_filters(console_client: Callable[..., Any]) -> None:
    priced = dataclasses.replace(mock_model(), prices=Prices(input=1000.0, cached_input=500.0, output=2000.0))
    client = console_client([priced], recording=True)
    sign_in(client)
    r = client.post(
        "/v1/chat/completions",
        headers=ADMIN,
        json={"model": "mock", "messages": [{"role": "user", "content": "price me <b>bold</b>"}]},
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    deadline = time.monotonic() + 60
    while "price me" not in client.get(f"/console/requests/{rid}").text:
        assert time.monotonic() < deadline, "the request was not recorded"
        time.sleep(0.1)
    detail = client.get(f"/console/requests/{rid}").text
    assert "&lt;b&gt;bold&lt;/b&gt;" in detail and "<b>bold</b>" not in detail  # content is escaped
    overview = client.get("/console?range=24h").text
    spend = overview.split('id="total-spend"', 1)[1].split("</div></div>", 1)[0]
    assert "$" in spend, spend
    conv_id = detail.split('href="/console/conversations/', 1)[1].split('"', 1)[0]
    md = client.get(f"/console/conversations/{conv_id}/export?format=markdown")
    assert md.status_code == 200 and "price me" in md.text
    assert md.headers["content-disposition"] == f'attachment; filename="conversation-{conv_id}.md"'
    js = client.get(f"/console/conversations/{conv_id}/export?format=json")
    assert js.json()["id"] == conv_id
    assert client.get("/console/conversations/nope").status_code == 404
    assert client.get("/console/requests/req_nope").status_code == 404
    # hostile filters: a page saying what is wrong
    for query, text in (
        ("status=abc", "HTTP status"),
        ("cursor=not-a-cursor", "Invalid pagination cursor"),
        ("range=custom&since=2026-05-01&until=2026-04-01", "start before its end"),
        ("range=forever", "Unknown range"),
    ):
        page = client.get(f"/console/requests?{query}")
        assert page.status_code == 200 and text in page.text, query
    assert "Invalid pagination cursor" in client.get("/console/conversations?cursor=zzz").text
    assert client.get("/console?range=custom&since=2000-01-01&until=2026-01-01").status_code == 200
    for since, until in (
        ("0001-01-01", "0001-01-02"),
        ("9999-12-30", "9999-12-31"),
    ):
        page = client.get(f"/console?range=custom&since={since}&until={until}")
        assert page.status_code == 200 and "start before its end" in page.text, (since, until)
    # an end past any record reads as "until now"
    assert client.get("/console?range=custom&since=2026-01-01&until=9999-12-31").status_code == 200
    # the request log filters by user and by the client's request id
    assert rid in client.get(f"/console/requests?request_id={rid}").text
    assert rid not in client.get("/console/requests?user=nobody").text
