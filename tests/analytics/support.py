"""Rollups as they should be: computed here, in Python, from the raw request_log rows (a GROUP BY of our own)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db.models import (
    LATENCY_BOUNDS_MS,
    USAGE_CALLERS_DAILY,
    USAGE_DAILY,
    USAGE_FACETS_DAILY,
    USAGE_FACETS_HOURLY,
    USAGE_HOURLY,
    RequestLog,
)

DIMS = ("model", "key_id", "backend", "operation", "outcome", "error_type", "team_id", "user_id")
CALLER_DIMS = ("key_id", "user", "client_ip")
FACET_DIMS = ("facet", "value", "outcome", "error_type")
#: facet -> the request_log column it splits by (None: the facet of all requests)
FACETS = {"": None, "model": "model", "key_id": "key_id", "backend": "backend"}


def _bucket_of(value: float) -> int:
    for i, bound in enumerate(LATENCY_BOUNDS_MS):
        if value <= bound:
            return i
    return len(LATENCY_BOUNDS_MS)


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def raw_rows(engine: Engine) -> list[dict[str, Any]]:
    table = RequestLog.__table__
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


def expected(engine: Engine) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """{"usage_hourly" | "usage_daily" | "usage_callers_daily" | "usage_facets_hourly" |
    "usage_facets_daily": {(bucket, *dims): {sum: value}}}."""
    out: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {
        name: defaultdict(lambda: defaultdict(float))
        for name in (
            "usage_hourly",
            "usage_daily",
            "usage_callers_daily",
            "usage_facets_hourly",
            "usage_facets_daily",
        )
    }
    for row in raw_rows(engine):
        created = _utc(row["created_at"])
        hour = created.replace(minute=0, second=0, microsecond=0)
        dims = tuple(row[d] or "" for d in DIMS)
        keys = [("usage_hourly", (hour, *dims)), ("usage_daily", (hour.replace(hour=0), *dims))]
        for facet, column in FACETS.items():
            fdims = (
                facet,
                (row[column] or "") if column else "",
                row["outcome"] or "",
                row["error_type"] or "",
            )
            keys.append(("usage_facets_hourly", (hour, *fdims)))
            keys.append(("usage_facets_daily", (hour.replace(hour=0), *fdims)))
        for name, key in keys:
            acc = out[name][key]
            acc["requests"] += 1
            acc["estimated"] += int(bool(row["tokens_estimated"]))
            for col in (
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "cached_tokens",
                "reasoning_tokens",
            ):
                acc[col] += row[col] or 0
            if row.get("cost") is not None:
                acc["priced"] += 1
                acc["cost"] += row["cost"]
            acc["latency_ms_sum"] += row["latency_ms"] or 0.0
            acc[f"latency_b{_bucket_of(row['latency_ms'] or 0.0):02d}"] += 1
            if row["ttft_ms"] is not None:
                acc["ttft_count"] += 1
                acc["ttft_ms_sum"] += row["ttft_ms"]
                acc[f"ttft_b{_bucket_of(row['ttft_ms']):02d}"] += 1
        acc = out["usage_callers_daily"][(hour.replace(hour=0), *(row[d] or "" for d in CALLER_DIMS))]
        acc["requests"] += 1
        acc["errors"] += int(row["outcome"] != "ok")
        acc["estimated"] += int(bool(row["tokens_estimated"]))
        for col in (
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cached_tokens",
            "reasoning_tokens",
        ):
            acc[col] += row[col] or 0
        if row.get("cost") is not None:
            acc["priced"] += 1
            acc["cost"] += row["cost"]
    return {name: {k: _rounded(v) for k, v in table.items()} for name, table in out.items()}


def _rounded(sums: dict[str, float]) -> dict[str, Any]:
    return {k: round(v, 3) for k, v in sums.items() if v}


def stored(engine: Engine) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """What the rollup tables hold, in the shape of `expected` (zero sums left out)."""
    out = {}
    for table, dims in (
        (USAGE_HOURLY, DIMS),
        (USAGE_DAILY, DIMS),
        (USAGE_CALLERS_DAILY, CALLER_DIMS),
        (USAGE_FACETS_HOURLY, FACET_DIMS),
        (USAGE_FACETS_DAILY, FACET_DIMS),
    ):
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        with engine.connect() as conn:
            for r in conn.execute(sa.select(table)).mappings():
                key = (_utc(r["bucket"]), *(r[d] for d in dims))
                sums = {c.name: r[c.name] for c in table.columns if c.name not in ("bucket", *dims)}
                rows[key] = _rounded({k: float(v) for k, v in sums.items()})
        out[table.name] = rows
    return out


def assert_rollups_match(engine: Engine) -> int:
    """The rollups equal a GROUP BY over the raw rows; returns the number of raw rows."""
    want, have = expected(engine), stored(engine)
    for name in want:
        missing = set(want[name]) - set(have[name])
        extra = set(have[name]) - set(want[name])
        assert not missing and not extra, f"{name}: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
        for key, sums in want[name].items():
            assert have[name][key] == sums, f"{name} {key}: stored {have[name][key]}, log says {sums}"
    return len(raw_rows(engine))
