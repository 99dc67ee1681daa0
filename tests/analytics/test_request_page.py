"""The request log page: keyset cursors never skip or repeat a row while others are inserted; filters."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

from llm_backend.db.repositories import InvalidCursor, RequestLogRepository
from llm_backend.db.session import make_engine, session_scope
from llm_backend.services.analytics import RequestFilter, request_detail, request_page

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _row(rid: str, when: datetime, **kw: object) -> dict[str, object]:
    return {
        "request_id": rid,
        "created_at": when,
        "route": "/v1/chat/completions",
        "operation": "chat",
        "status_code": 200,
        "outcome": "ok",
        "model": "m",
        "user": None,
        "client_ip": None,
        "backend": None,
        "key_id": None,
        "error_type": None,
        "client_request_id": None,
        **kw,
    }


def test_pages_have_no_gaps_or_duplicates_under_concurrent_inserts(db_url: str, engine: Engine) -> None:
    # many rows share a created_at (ties are broken by request_id)
    first = [_row(f"a{i:04d}", NOW - timedelta(seconds=i // 3), user=f"u{i % 3}") for i in range(900)]
    with session_scope(engine, write=True) as s:
        RequestLogRepository(s).insert_ignore(first)
    stop = threading.Event()
    errors: list[BaseException] = []

    def inserter() -> None:
        eng = make_engine(db_url)
        n = 0
        try:
            while not stop.is_set():
                # newer rows, rows at the same instants as existing ones (a late replay), older rows
                rows = [
                    _row(f"b{n:05d}", NOW + timedelta(seconds=n)),
                    _row(f"a{n % 900:04d}x", NOW - timedelta(seconds=(n % 900) // 3)),
                    _row(f"c{n:05d}", NOW - timedelta(days=1, seconds=n)),
                ]
                with session_scope(eng, write=True) as s:
                    RequestLogRepository(s).insert_ignore(rows)
                n += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            eng.dispose()

    thread = threading.Thread(target=inserter)
    thread.start()
    try:
        seen: list[str] = []
        cursor = None
        flt = RequestFilter(since=NOW - timedelta(hours=1), until=NOW + timedelta(seconds=1))
        while True:
            page = request_page(engine, flt, limit=37, cursor=cursor)
            seen += [i["request_id"] for i in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert len(seen) == len(set(seen)), "a row was shown twice"
    assert {r["request_id"] for r in first} <= set(seen), "a row that existed throughout was skipped"


def test_order_filters_and_detail(engine: Engine) -> None:
    rows = [
        _row("r1", NOW, user="alice", client_ip="10.0.0.1", backend="east", key_id="k1"),
        _row("r2", NOW, user="bob", outcome="error", status_code=429, error_type="rate_limit_exceeded"),
        _row("r3", NOW - timedelta(minutes=1), user="alice", client_request_id="mine", model="other"),
    ]
    with session_scope(engine, write=True) as s:
        RequestLogRepository(s).insert_ignore(rows)
    everything = request_page(engine, RequestFilter())
    assert [i["request_id"] for i in everything.items] == ["r2", "r1", "r3"]
    assert everything.next_cursor is None and everything.items[0]["object"] == "request"

    def ids(**kw: object) -> list[str]:
        return [i["request_id"] for i in request_page(engine, RequestFilter(**kw)).items]  # type: ignore[arg-type]

    assert ids(user="alice") == ["r1", "r3"]
    assert ids(outcome="error") == ids(status_code=429) == ["r2"]
    assert ids(client_ip="10.0.0.1") == ids(backend="east") == ids(key_id="k1") == ["r1"]
    assert ids(client_request_id="mine") == ids(model="other") == ids(request_id="r3") == ["r3"]
    assert ids(since=NOW) == ["r2", "r1"] and ids(until=NOW) == ["r3"]
    with pytest.raises(InvalidCursor):
        request_page(engine, RequestFilter(), cursor="not-a-cursor")
    detail = request_detail(engine, "r2")
    assert detail is not None and detail["error_type"] == "rate_limit_exceeded" and detail["messages"] == []
    assert request_detail(engine, "nope") is None
