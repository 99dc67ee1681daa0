"""Through the running app and the openai SDK: a mixed load's rollups equal a GROUP BY over its raw rows, and
/admin/overview, /admin/usage and /admin/requests (cursor pages) report them; SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy.engine import Engine

from tests.analytics.support import assert_rollups_match, raw_rows
from tests.e2e_recording.conftest import (
    FakeAzure,
    azure_model,
    completion,
    json_response,
    mock_model,
    sse_response,
    stream_events,
    uvicorn_server,
    wait_for,
)

ADMIN = "adm-analytics"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def _reply(body: dict[str, Any]) -> Any:
    text = body["messages"][-1]["content"]
    if "fail" in text:
        return json_response(
            {"error": {"message": "no", "type": "invalid_request_error", "code": "content_filter"}}, 400
        )
    if body.get("stream"):
        return sse_response(
            stream_events(("Hel", "lo"), {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
        )
    return json_response(
        completion("Hello there.", {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14})
    )


def _key(http: httpx.Client, name: str) -> tuple[str, str]:
    r = http.post("/admin/keys", json={"name": name}, headers=ADMIN_HEADERS)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


def test_mixed_load_through_the_sdk(
    db_url: str, engine: Engine, app_for: Callable[..., Any], fake_azure: FakeAzure
) -> None:
    fake_azure.reply = _reply
    app = app_for(db_url, [azure_model(fake_azure.httpserver), mock_model()], auth="keys", admin_key=ADMIN)
    sent = 0
    with uvicorn_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        keys = [_key(http, "alice"), _key(http, "bob")]
        for n in range(36):
            _, secret = keys[n % 2]
            sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)
            messages = [{"role": "user", "content": f"{'fail ' if n % 9 == 4 else ''}question {n}"}]
            model = "mock" if n % 3 == 0 else "gpt-4o"
            sent += 1
            try:
                if n % 4 == 1:
                    chunks = list(
                        sdk.chat.completions.create(
                            model=model,
                            messages=messages,
                            stream=True,
                            user=f"user-{n % 5}",
                            stream_options={"include_usage": True},
                        )
                    )
                    assert chunks
                else:
                    sdk.chat.completions.create(model=model, messages=messages, user=f"user-{n % 5}")
            except openai.APIStatusError as exc:
                assert exc.status_code == 400
        for secret in (keys[0][1], "sk-llmb-not-a-key"):  # an unknown model, and an unknown key
            sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)
            with pytest.raises(openai.APIStatusError):
                sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        wait_for(lambda: len(raw_rows(engine)) >= sent + 1, 60, "every request recorded")
        rows = raw_rows(engine)
        assert assert_rollups_match(engine) == len(rows)
        outcomes = Counter(r["outcome"] for r in rows)
        assert outcomes["ok"] >= 25 and outcomes["error"] >= 5

        r = http.get("/admin/overview", params={"since": "2d"}, headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        ov = r.json()
        assert ov["object"] == "usage.overview" and ov["granularity"] == "hour"
        assert ov["totals"]["requests"] == len(rows)
        assert ov["totals"]["total_tokens"] == sum(r["total_tokens"] for r in rows)
        assert ov["totals"]["errors"] == sum(r["outcome"] != "ok" for r in rows)
        assert sum(p["totals"]["requests"] for p in ov["series"]) == len(rows)
        assert len(ov["series"]) >= 48
        assert ov["totals"]["latency_p50_ms"] is not None and ov["totals"]["ttft_p95_ms"] is not None
        by_key = {b["value"]: b for b in ov["breakdowns"]["key"]}
        assert by_key[keys[0][0]]["label"] == "alice"
        assert by_key[keys[0][0]]["requests"] == sum(r["key_id"] == keys[0][0] for r in rows)
        users = {b["value"]: b["requests"] for b in ov["breakdowns"]["user"]}
        assert users == dict(Counter(r["user"] for r in rows))
        kinds = {k["kind"]: k["requests"] for k in ov["errors_by_kind"]}
        assert sum(kinds.values()) == ov["totals"]["errors"]
        assert ov["top_callers"][0]["requests"] >= ov["top_callers"][-1]["requests"]

        r = http.get("/admin/usage", params={"since": "2d", "group_by": "key,model"}, headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        usage = {(u["key_id"], u["model"]): u for u in r.json()["data"]}
        expected = Counter((r["key_id"], r["model"]) for r in rows)
        assert {k: u["requests"] for k, u in usage.items()} == dict(expected)
        assert usage[(keys[1][0], "gpt-4o")]["key_name"] == "bob"

        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"since": "2d", "limit": 7}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/admin/requests", params=params, headers=ADMIN_HEADERS).json()
            assert "data" in page, page
            seen += [item["request_id"] for item in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(r["request_id"] for r in rows) and len(seen) == len(set(seen))
        page = http.get("/admin/requests", params={"user": "user-1", "outcome": "ok"}, headers=ADMIN_HEADERS)
        want = {r["request_id"] for r in rows if r["user"] == "user-1" and r["outcome"] == "ok"}
        assert {i["request_id"] for i in page.json()["data"]} == want
        bad = http.get("/admin/requests", params={"cursor": "bm9wZQ"}, headers=ADMIN_HEADERS)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"
        bad = http.get("/admin/overview", params={"granularity": "week"}, headers=ADMIN_HEADERS)
        assert bad.status_code == 400 and "error" in bad.json()
        denied = http.get("/admin/overview", headers={"Authorization": f"Bearer {keys[0][1]}"})
        assert denied.status_code in (401, 403) and "error" in denied.json()
