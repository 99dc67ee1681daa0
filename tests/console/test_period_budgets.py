"""The console's key pages show and edit a key's budget for a fixed period, and keep its counter when the
period is saved unchanged."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_backend.db.models import RequestLog
from llm_backend.db.session import make_engine, session_scope
from tests.console.conftest import ADMIN_KEY, csrf_of, sign_in

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _key(client: Any) -> dict[str, Any]:
    return client.get("/admin/keys", headers=ADMIN).json()["data"][0]  # type: ignore[no-any-return]


def test_a_key_period_budget_is_created_shown_and_edited(
    console_client: Callable[..., Any], tmp_path: Path
) -> None:
    client = console_client()
    sign_in(client)
    token = csrf_of(client.get("/console/keys").text)
    created = client.post(
        "/console/keys",
        data={
            "name": "quarter",
            "csrf_token": token,
            "period_tokens": "50_000",
            "period_spend": "12.5",
            "period_start": "2026-01-01",
            "period_end": "2099-04-01",
        },
    )
    assert created.status_code == 201, created.text
    key = _key(client)
    assert (key["period_tokens"], key["period_spend"], key["period_start"], key["period_end"]) == (
        50_000,
        12.5,
        "2026-01-01T00:00:00+00:00",
        "2099-04-01T00:00:00+00:00",
    )
    listing = client.get("/console/keys").text
    assert "period 50,000 tokens 12.5 spend 2026-01-01 00:00 to 2099-04-01 00:00" in listing
    assert "period 50,000 tokens</small>" in listing and "period 12.5 spend</small>" in listing
    # what the log holds within the period is what is left off it; a row before the period is not
    engine = make_engine(f"sqlite:///{tmp_path}/console.db")
    with session_scope(engine) as session:
        for n, when in ((1, datetime(2026, 3, 1, tzinfo=UTC)), (2, datetime(2025, 12, 31, 23, tzinfo=UTC))):
            session.add(
                RequestLog(
                    request_id=f"req-{n}",
                    created_at=when,
                    route="/v1/chat/completions",
                    operation="chat.completions",
                    status_code=200,
                    outcome="ok",
                    stream=False,
                    attempts=1,
                    prompt_tokens=1_000,
                    completion_tokens=500,
                    total_tokens=1_500,
                    cached_tokens=0,
                    reasoning_tokens=0,
                    tokens_estimated=False,
                    latency_ms=1.0,
                    key_id=key["id"],
                    cost=2.25,
                )
            )
    engine.dispose()
    listing = client.get("/console/keys").text
    assert "period 48,500 tokens</small>" in listing and "period 10.25 spend</small>" in listing
    edit = client.get(f"/console/keys/{key['id']}").text
    assert 'name="period_end"' in edit and 'value="2099-04-01T00:00:00+00:00"' in edit

    # saved as shown: the same start (the same counter); a new amount and end
    saved = client.post(
        f"/console/keys/{key['id']}",
        data={
            "csrf_token": token,
            "name": "quarter",
            "period_tokens": "",
            "period_spend": "20",
            "period_start": key["period_start"],
            "period_end": "2099-07-01T00:00Z",
            "enabled": "on",
        },
        follow_redirects=False,
    )
    assert saved.status_code == 303, saved.text
    after = _key(client)
    assert (after["period_tokens"], after["period_spend"], after["period_start"], after["period_end"]) == (
        None,
        20.0,
        key["period_start"],
        "2099-07-01T00:00:00+00:00",
    )
    # bad input: the form again naming the field, nothing changed
    for data, field in (
        ({"period_end": "2025-01-01"}, "period_end"),
        ({"period_end": "someday"}, "period_end"),
        ({"period_spend": "-1"}, "period_spend"),
        ({"period_spend": "20", "period_end": "10000-01-01"}, "period_end"),
    ):
        bad = client.post(f"/console/keys/{key['id']}", data={"csrf_token": token, "name": "quarter", **data})
        assert bad.status_code == 400 and field in bad.text, (data, bad.text[:500])
    assert _key(client)["period_end"] == "2099-07-01T00:00:00+00:00"
    bad = client.post("/console/keys", data={"name": "x", "csrf_token": token, "period_tokens": "10"})
    assert bad.status_code == 400 and "period_end" in bad.text
