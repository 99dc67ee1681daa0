"""The facet rollups an unfiltered overview reads give the same overview as the wide rollups (and whole days
of an hourly range read by the day give the same breakdowns as reading it all by the hour); the facets are
pruned with the others. SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db import migrate
from llm_backend.db.models import USAGE_FACETS_DAILY, USAGE_FACETS_HOURLY
from llm_backend.db.repositories import HOUR, RollupRepository
from llm_backend.db.session import session_scope
from llm_backend.recording.sink import write_batch
from llm_backend.services import analytics
from tests.analytics.support import assert_rollups_match
from tests.analytics.test_rollups import NOW, record

RANGES = [
    (NOW - timedelta(days=30), NOW, None),  # by the day
    (NOW - timedelta(days=7, minutes=20), NOW + timedelta(minutes=5), None),  # by the hour, partial days
    (NOW - timedelta(hours=24), NOW, None),
    (NOW - timedelta(days=3), NOW, "day"),
    (NOW - timedelta(days=40), NOW - timedelta(days=2), "hour"),
    (NOW - timedelta(minutes=30), NOW, None),  # under an hour
]


@pytest.fixture
def loaded(engine: Engine) -> Engine:
    rng = random.Random(21)
    records = [record(i, rng, spread_h=24 * 35) for i in range(900)]
    for start in range(0, len(records), 150):
        write_batch(engine, records[start : start + 150], record_content=False)
    return engine


def _both(engine: Engine, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> tuple[dict, dict]:  # type: ignore[type-arg]
    narrow = analytics.overview(engine, **kwargs).to_dict()  # type: ignore[arg-type]
    with monkeypatch.context() as m:
        m.setattr(analytics, "_NARROW", False)
        wide = analytics.overview(engine, **kwargs).to_dict()  # type: ignore[arg-type]
    return narrow, wide


@pytest.mark.parametrize(("since", "until", "granularity"), RANGES)
def test_overview_is_the_same_from_facets_and_from_the_wide_rollups(
    loaded: Engine, monkeypatch: pytest.MonkeyPatch, since: datetime, until: datetime, granularity: str | None
) -> None:
    narrow, wide = _both(loaded, monkeypatch, since=since, until=until, granularity=granularity)
    assert narrow == wide
    with loaded.connect() as conn:
        table = sa.table("request_log", sa.column("created_at"))
        start, end = datetime.fromisoformat(narrow["since"]), datetime.fromisoformat(narrow["until"])
        count = conn.scalar(
            sa.select(sa.func.count())
            .select_from(table)
            .where(table.c.created_at >= start, table.c.created_at < end)
        )
    assert narrow["totals"]["requests"] == count
    assert sum(p["totals"]["requests"] for p in narrow["series"]) == count
    for name in ("model", "key", "backend"):
        rows = narrow["breakdowns"][name]
        assert sum(r["requests"] for r in rows) <= count
        if count:
            assert rows, name
    if count > 100:
        assert {r["value"] for r in narrow["breakdowns"]["model"]} == {"gpt-4o", "gpt-4o-mini", None}


def test_breakdowns_by_day_and_hour_match_reading_every_hour(
    loaded: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    since, until = NOW - timedelta(days=6, hours=5), NOW + timedelta(hours=2)
    assert len(analytics._spans(HOUR, since, until)) == 3  # days in the middle, hours at both ends
    for narrow in (True, False):
        with monkeypatch.context() as m:
            m.setattr(analytics, "_NARROW", narrow)
            split = analytics.overview(loaded, since=since, until=until).to_dict()
            m.setattr(analytics, "_spans", lambda g, s, e: [(g, s, e)])
            whole = analytics.overview(loaded, since=since, until=until).to_dict()
        assert split == whole
        assert split["granularity"] == "hour"


def test_filtered_overviews_read_the_wide_rollups(loaded: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # a filter the facets cannot apply: both paths give the same numbers, and they are a subset
    since, until = NOW - timedelta(days=30), NOW
    for filters in ({"key_id": "k1"}, {"model": "gpt-4o"}, {"backend": "east"}):
        narrow, wide = _both(loaded, monkeypatch, since=since, until=until, **filters)
        assert narrow == wide
        everything = analytics.overview(loaded, since=since, until=until).to_dict()
        assert 0 < narrow["totals"]["requests"] < everything["totals"]["requests"]


def test_facets_are_rebuilt_and_pruned_with_the_other_rollups(loaded: Engine) -> None:
    assert assert_rollups_match(loaded) == 900
    with loaded.begin() as conn:
        conn.execute(sa.delete(USAGE_FACETS_HOURLY))
        conn.execute(sa.update(USAGE_FACETS_DAILY).values(requests=USAGE_FACETS_DAILY.c.requests + 1))
    with session_scope(loaded, write=True) as s:
        RollupRepository(s).rebuild(keep_pruned=False)
    assert assert_rollups_match(loaded) == 900
    # the rollups' own retention drops old facet buckets too
    now = datetime.now(UTC)
    migrate.prune(loaded, timedelta(days=30), rollups_older_than=(now - (NOW - timedelta(days=10))))
    cutoff = NOW - timedelta(days=10)
    with loaded.connect() as conn:
        for table in (USAGE_FACETS_HOURLY, USAGE_FACETS_DAILY):
            oldest = conn.scalar(sa.select(sa.func.min(table.c.bucket)))
            oldest = oldest.replace(tzinfo=UTC) if oldest.tzinfo is None else oldest
            assert oldest >= cutoff - timedelta(days=1), table.name
            assert conn.scalar(sa.select(sa.func.count()).select_from(table)) > 0
