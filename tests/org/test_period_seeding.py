"""A budget period's counter re-seeded from the request log: the sum over [start, end) exactly (the start
counts, the end does not), on SQLite and PostgreSQL, through the gate the serving path uses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from llm_backend.db.models import RequestLog
from llm_backend.db.repositories import period_totals
from llm_backend.db.session import make_engine, session_scope
from llm_backend.errors import RateLimited
from llm_backend.limits import InMemoryLimiter, KeyLimits, Level
from llm_backend.services.access import Gate
from llm_backend.services.flight import Caller
from llm_backend.services.keys import KeyStore

START = datetime(2026, 3, 1, tzinfo=UTC)
END = datetime(2026, 4, 1, tzinfo=UTC)


def _row(n: int, when: datetime, tokens: int, cost: float | None, team: str = "team_p") -> RequestLog:
    return RequestLog(
        request_id=f"req_{n}",
        created_at=when,
        route="/v1/chat/completions",
        operation="chat",
        status_code=200,
        outcome="ok",
        stream=False,
        attempts=1,
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        total_tokens=tokens,
        tokens_estimated=False,
        latency_ms=1.0,
        cost=cost,
        team_id=team,
        key_id="key_p",
    )


@pytest.fixture
def logged(db_url: str) -> str:
    engine = make_engine(db_url)
    try:
        with session_scope(engine, write=True) as session:
            session.add_all(
                [
                    _row(1, START - timedelta(microseconds=1), 1000, 1.0),  # before the period
                    _row(2, START, 10, 0.25),  # its first moment counts
                    _row(3, START + timedelta(days=3), 20, None),  # a model without prices
                    _row(4, END - timedelta(seconds=1), 30, 0.5),
                    _row(5, END, 4000, 4.0),  # the end is exclusive
                    _row(6, START + timedelta(days=1), 5000, 5.0, team="team_other"),
                ]
            )
    finally:
        engine.dispose()
    return db_url


def test_period_totals_cover_the_start_and_not_the_end(logged: str) -> None:
    engine = make_engine(logged)
    try:
        with session_scope(engine) as session:
            assert period_totals(session, "team", "team_p", START, END) == (60, pytest.approx(0.75))
            assert period_totals(session, "key", "key_p", START, END) == (5060, pytest.approx(5.75))
            tokens, _ = period_totals(session, "team", "team_p", None, END)  # no lower bound
            assert tokens == 1060
    finally:
        engine.dispose()


async def test_the_gate_seeds_a_lost_period_counter_from_the_log(logged: str) -> None:
    engine = make_engine(logged)
    now = (START + timedelta(days=10)).timestamp()
    limiter = InMemoryLimiter(seed_budgets=True, clock=lambda: now)
    gate = Gate(limiter, 10, store=KeyStore(engine))
    limits = KeyLimits(period_tokens=100, period_start=START.timestamp(), period_end=END.timestamp())
    caller = Caller(request_id="r", route="/v1/chat/completions", key_id="key_p")
    caller.levels = (Level("team", "team_p", limits, name="p"),)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    try:
        admission = await gate(caller, None, body)  # type: ignore[arg-type]
        assert admission is not None  # 60 of 100 used: a reservation of about 25 fits
        await admission.settle(25)
        with pytest.raises(RateLimited) as info:
            await gate(caller, None, body)  # type: ignore[arg-type]
        assert info.value.code == "team_budget_exceeded"
        assert "used 85," in info.value.message and "period" in info.value.message
        assert "Retry-After" not in info.value.headers
    finally:
        await limiter.close()
        engine.dispose()
