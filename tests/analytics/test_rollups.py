"""Rollups kept by the recorder's writes: equal to a GROUP BY over the raw rows after mixed writes, replays,
concurrent writers, rebuilds and pruning; on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db import migrate
from llm_backend.db.models import (
    USAGE_CALLERS_DAILY,
    USAGE_DAILY,
    USAGE_FACETS_DAILY,
    USAGE_FACETS_HOURLY,
    USAGE_HOURLY,
    RequestLog,
)
from llm_backend.db.repositories import RequestLogRepository, RollupRepository
from llm_backend.db.session import make_engine, session_scope
from llm_backend.recording.records import OUTCOME_INTERRUPTED, RequestRecord, Usage
from llm_backend.recording.sink import write_batch
from llm_backend.services import analytics
from tests.analytics.support import assert_rollups_match

NOW = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)


def record(i: int, rng: random.Random, *, base: datetime = NOW, spread_h: float = 72.0) -> RequestRecord:
    outcome = rng.choice(["ok", "ok", "ok", "error", "client_disconnected", OUTCOME_INTERRUPTED])
    stream = rng.random() < 0.5
    prompt = rng.randrange(0, 5000)
    completion = rng.randrange(0, 800)
    return RequestRecord(
        request_id=f"req-{i}",
        created_at=base - timedelta(hours=rng.random() * spread_h),
        route="/v1/chat/completions",
        operation=rng.choice(["chat", "chat", "embeddings", "responses"]),
        status_code=200 if outcome == "ok" else rng.choice([400, 429, 502]),
        outcome=outcome,
        error_type=None if outcome == "ok" else rng.choice([None, "rate_limit_exceeded", "upstream_error"]),
        stream=stream,
        model_requested="gpt",
        model=rng.choice(["gpt-4o", "gpt-4o-mini", None]),
        backend=rng.choice(["east", "west", None]),
        usage=Usage(
            prompt,
            completion,
            prompt + completion,
            cached_tokens=rng.choice([None, 0, prompt // 2]),
            reasoning_tokens=rng.choice([None, 10]),
            estimated=rng.random() < 0.2,
        ),
        latency_ms=rng.choice([0.0, 49.9, 50.0, 50.1, rng.uniform(0, 70000), 1e7]),
        ttft_ms=rng.uniform(1, 3000) if stream else None,
        key_id=rng.choice(["k1", "k2", "k3", None]),
        user=rng.choice(["alice", "bob", None, "x" * 300]),
        client_ip=rng.choice(["10.0.0.1", "10.0.0.2", None]),
    )


def test_rollups_equal_a_group_by_after_mixed_writes_and_replays(engine: Engine) -> None:
    rng = random.Random(5)
    records = [record(i, rng) for i in range(600)]
    for start in range(0, 600, 97):
        assert write_batch(engine, records[start : start + 97], record_content=False).written > 0
    assert assert_rollups_match(engine) == 600
    before = _daily_totals(engine)
    # a replay of everything (journal replay after an outage, a retried batch): nothing counted twice
    assert write_batch(engine, records, record_content=False).written == 0
    # the finished record of a request whose `interrupted` row is stored already: the first row stays
    stored = next(r for r in records if r.outcome == OUTCOME_INTERRUPTED)
    later = dataclasses.replace(stored, outcome="ok", status_code=200, usage=Usage(1, 1, 2))
    assert write_batch(engine, [later, *records[:5]], record_content=False).written == 0
    assert _daily_totals(engine) == before
    assert assert_rollups_match(engine) == 600


def _daily_totals(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(sa.func.sum(USAGE_DAILY.c.requests), sa.func.sum(USAGE_DAILY.c.total_tokens))
        )
        requests, tokens = row.one()
    return int(requests), int(tokens)


def test_insert_ignore_counts_only_the_rows_it_inserted(engine: Engine) -> None:
    rows = [
        {
            "request_id": f"r{i}",
            "created_at": NOW,
            "route": "/v1/chat/completions",
            "operation": "chat",
            "status_code": 200,
            "outcome": "ok",
            "total_tokens": 10,
        }
        for i in range(5)
    ]
    with session_scope(engine, write=True) as s:
        assert RequestLogRepository(s).insert_ignore(rows[:3]) == {"r0", "r1", "r2"}
    with session_scope(engine, write=True) as s:
        assert RequestLogRepository(s).insert_ignore(rows + rows) == {"r3", "r4"}
    assert _daily_totals(engine) == (5, 50)
    assert assert_rollups_match(engine) == 5


@pytest.mark.postgres
def test_concurrent_writers_on_postgresql_lose_no_increment(pg_migrated_url: str) -> None:
    """Writers in threads with their own connections, all on the same few rollup rows at once."""
    setup = make_engine(pg_migrated_url)
    names = ", ".join(t.name for t in reversed(RequestLog.metadata.sorted_tables))
    with setup.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {names} CASCADE")
    rng = random.Random(9)
    records = [record(i, rng, spread_h=2.0) for i in range(1200)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def writer(part: list[RequestRecord]) -> None:
        eng = make_engine(pg_migrated_url)
        try:
            barrier.wait()
            for start in range(0, len(part), 20):
                write_batch(eng, part[start : start + 20], record_content=False)
        except BaseException as exc:
            errors.append(exc)
        finally:
            eng.dispose()

    # every record is written by two writers (as a replay racing the first write would be)
    parts = [records[0::2], records[1::2], records[0::2][::-1], records[1::2][::-1]]
    threads = [threading.Thread(target=writer, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    try:
        assert assert_rollups_match(setup) == 1200
    finally:
        setup.dispose()


def test_rebuild_gives_what_the_recorder_kept(engine: Engine) -> None:
    rng = random.Random(3)
    write_batch(engine, [record(i, rng) for i in range(300)], record_content=False)
    kept = _tables(engine)
    with session_scope(engine, write=True) as s:
        RollupRepository(s).rebuild(keep_pruned=False)
    assert _tables(engine) == kept
    # rows written behind the rollups' back (an older release during a rolling upgrade) come in too
    with session_scope(engine, write=True) as s:
        RequestLogRepository(s).insert_ignore(
            [
                {
                    "request_id": "behind",
                    "created_at": NOW,
                    "route": "/v1/chat/completions",
                    "operation": "chat",
                    "status_code": 200,
                    "outcome": "ok",
                    "total_tokens": 7,
                }
            ],
            rollups=False,
        )
    with session_scope(engine, write=True) as s:
        RollupRepository(s).rebuild(since=NOW - timedelta(days=1), keep_pruned=False)
    assert assert_rollups_match(engine) == 301


def _tables(engine: Engine) -> list[list[Any]]:
    with engine.connect() as conn:
        return [
            # float sums to a few places: the same numbers added in another order differ in the last bits
            sorted(
                tuple(round(v, 6) if isinstance(v, float) else v for v in r)
                for r in conn.execute(sa.select(t))
            )
            for t in (USAGE_HOURLY, USAGE_DAILY, USAGE_CALLERS_DAILY, USAGE_FACETS_HOURLY, USAGE_FACETS_DAILY)
        ]


def test_prune_keeps_rollups_and_reports(engine: Engine) -> None:
    now = datetime.now(UTC)
    rng = random.Random(4)
    old = [record(i, rng, base=now - timedelta(days=40), spread_h=24) for i in range(100)]
    new = [record(i + 100, rng, base=now, spread_h=24) for i in range(100)]
    write_batch(engine, old + new, record_content=False)
    window = (now - timedelta(days=60), now + timedelta(hours=1))
    before = analytics.usage_report(engine, *window, ["model"])
    deleted = migrate.prune(engine, timedelta(days=30))
    assert deleted == 100
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(RequestLog.__table__)) == 100
    assert analytics.usage_report(engine, *window, ["model"]) == before  # rollups kept
    # a rebuild (keeping the days of pruned rows) does not lose them either
    with session_scope(engine, write=True) as s:
        RollupRepository(s).rebuild()
    assert analytics.usage_report(engine, *window, ["model"]) == before
    # the rollups' own retention
    migrate.prune(engine, timedelta(days=30), rollups_older_than=timedelta(days=35))
    after = analytics.usage_report(engine, *window, ["model"])
    assert sum(r["requests"] for r in after) == 100


def test_percentile_from_buckets() -> None:
    counts = [0] * 16
    assert analytics.percentile(counts, 0.5) is None
    counts[0] = 10  # ten requests in (0, 50] ms
    assert analytics.percentile(counts, 0.5) == 25.0
    counts[15] = 10  # ten above the last bound
    assert analytics.percentile(counts, 0.95) == 60000.0
    assert analytics.percentile(counts, 0.5) == 50.0
