"""Usage analytics: the one place the console, /admin/usage and `llm-backend usage` get their numbers from.

Totals and time series come from the rollups the recorder keeps in the same transaction as the request
log (`usage_hourly`, `usage_daily`, `usage_callers_daily`, and the narrow `usage_facets_hourly` /
`usage_facets_daily` an unfiltered overview reads), never from a scan of the log: they stay fast at tens
of millions of requests. Rollups have whole-hour buckets (UTC), so a range is widened to whole
hours: `since` rounds down to its hour, `until` up to the next one (`until` already on the hour stays).
Day buckets (UTC) widen the same way to whole days.

Where each breakdown comes from:
- model, key, backend, errors by kind, the time series and the latency / TTFT percentiles: the hourly
  rollup for ranges up to `HOURLY_MAX_RANGE`, else the daily one (percentiles are estimated from the
  fixed histogram buckets of `llm_backend.db.models.LATENCY_BOUNDS_MS`, linearly within a bucket); the
  model / key / backend breakdowns of an hourly range read its whole UTC days from the daily rollup.
  Without a key / model / backend filter these come from the facet rollups, else from the wide ones;
- end user (`user`), client IP and top callers: `usage_callers_daily` (per UTC day x key x user x IP),
  over the whole UTC days the range touches; with a model or backend filter (which that table does not
  have) or a range under a day, from the request log itself, at most `RAW_SCAN_LIMIT` newest rows of the
  range (`Overview.callers_source` says which, `callers_complete` whether every row of the range counted).

The request log page (`request_page`) reads the raw log with keyset pagination on (created_at,
request_id): a cursor names the last row shown, so pages never skip or repeat a row, whatever is
inserted meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from llm_backend.db.models import (
    CALLER_SUMS,
    LATENCY_BOUNDS_MS,
    LATENCY_COLUMNS,
    TTFT_COLUMNS,
    Message,
    RequestLog,
)
from llm_backend.db.repositories import (
    DAY,
    HOUR,
    ApiKeyRepository,
    InvalidCursor,
    RollupRepository,
    floor_day,
    floor_hour,
)
from llm_backend.db.session import session_scope
from llm_backend.services.pricing import round_cost

__all__ = [
    "DAY",
    "HOUR",
    "BreakdownRow",
    "Caller",
    "ErrorKind",
    "InvalidCursor",
    "Overview",
    "RequestFilter",
    "RequestPage",
    "SeriesPoint",
    "Totals",
    "overview",
    "percentile",
    "request_detail",
    "request_page",
    "usage_report",
]

logger = logging.getLogger(__name__)

#: Ranges up to this long are shown (and summed) by the hour, longer ones by the day.
HOURLY_MAX_RANGE = timedelta(days=7)
#: At most this many of a range's newest request rows are read for a breakdown that rollups cannot give.
RAW_SCAN_LIMIT = 100_000
#: Breakdown rows per dimension in an overview (the largest by requests).
DEFAULT_TOP = 10
#: Groups `usage_report` can group by (its `group_by`), as before rollups.
USAGE_GROUPS = ("key", "model", "day", "user", "backend", "team", "user_id")
#: Named ranges of the console's picker.
RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
#: Request log page size bounds.
MAX_PAGE = 1000

_SCALAR_SUMS = (
    "requests",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "priced",
    "cost",
    "latency_ms_sum",
    "ttft_count",
    "ttft_ms_sum",
)
_HISTOGRAM_SUMS = (*_SCALAR_SUMS, *LATENCY_COLUMNS, *TTFT_COLUMNS)


# ---------------------------------------------------------------------------------------------------------
# Ranges


_LAST = datetime.max.replace(tzinfo=UTC)  # where rounding up past the calendar's end stops


def ceil_hour(when: datetime) -> datetime:
    """`when` rounded up to a whole UTC hour (unchanged when already on one; the calendar's last instant
    when no later hour exists)."""
    start = floor_hour(when)
    if start == when.astimezone(UTC):
        return start
    return start + timedelta(hours=1) if start < _LAST - timedelta(hours=1) else _LAST


def ceil_day(when: datetime) -> datetime:
    start = floor_day(when)
    if start == when.astimezone(UTC):
        return start
    return start + timedelta(days=1) if start < _LAST - timedelta(days=1) else _LAST


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def choose_granularity(since: datetime, until: datetime) -> str:
    """ "hour" for ranges up to HOURLY_MAX_RANGE, else "day"."""
    return HOUR if until - since <= HOURLY_MAX_RANGE else DAY


def aligned_range(since: datetime, until: datetime, granularity: str) -> tuple[datetime, datetime]:
    """[since, until) widened to whole buckets of `granularity`."""
    since, until = _aware(since), _aware(until)
    if granularity == HOUR:
        return floor_hour(since), ceil_hour(until)
    return floor_day(since), ceil_day(until)


# ---------------------------------------------------------------------------------------------------------
# Percentiles from histogram buckets


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) of durations counted in the rollup buckets (ms): found by rank, linear within
    its bucket (the first bucket from 0; the open last bucket reports its lower bound). None when empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if n <= 0:
            continue
        if seen + n >= rank:
            lower = 0.0 if i == 0 else float(LATENCY_BOUNDS_MS[i - 1])
            if i >= len(LATENCY_BOUNDS_MS):
                return lower
            upper = float(LATENCY_BOUNDS_MS[i])
            return round(lower + (upper - lower) * max(0.0, rank - seen) / n, 1)
        seen += n
    return float(LATENCY_BOUNDS_MS[-1])


# ---------------------------------------------------------------------------------------------------------
# Overview: the shapes


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over a set of requests. `cost` is None when none of them had prices configured (`priced` 0);
    latency and TTFT percentiles are estimated from histogram buckets (None without requests / streams)."""

    requests: int = 0
    errors: int = 0
    estimated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    priced: int = 0
    cost: float | None = None
    latency_avg_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """One bucket of the time series (every bucket of the range is present, empty ones with zeros):
    `start` is the bucket's UTC start; `errors_by_kind` maps an error kind (see `ErrorKind`) to a count."""

    start: datetime
    totals: Totals
    errors_by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """Failed requests of one kind: `kind` is the recorded error type (e.g. rate_limit_exceeded), or the
    outcome (client_disconnected, interrupted) when none was recorded."""

    kind: str
    outcome: str
    requests: int


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    """One value of a breakdown dimension (None: requests without one, e.g. no key) and its totals.
    `label` is what to show: the key's name for keys (None once deleted), else the value."""

    value: str | None
    label: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float | None
    latency_avg_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: a key (and its name), the end user it named and the client address, with totals."""

    key_id: str | None
    key_name: str | None
    user: str | None
    client_ip: str | None
    requests: int
    errors: int
    total_tokens: int
    cost: float | None


@dataclass(frozen=True, slots=True)
class Overview:
    """What the console's overview shows for [since, until) (already widened to whole buckets).

    `breakdowns` has the keys "model", "key", "backend", "user", "client_ip", each the `top` largest by
    requests. `callers_source` is "rollup" (usage_callers_daily over `callers_since`..`callers_until`,
    whole UTC days) or "log" (raw rows; `callers_complete` False when the range held more than
    RAW_SCAN_LIMIT rows and only the newest were read)."""

    since: datetime
    until: datetime
    granularity: str
    filters: dict[str, str | None]
    totals: Totals
    series: list[SeriesPoint]
    errors_by_kind: list[ErrorKind]
    breakdowns: dict[str, list[BreakdownRow]]
    top_callers: list[Caller]
    callers_source: str
    callers_since: datetime
    callers_until: datetime
    callers_complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _totals(sums: Mapping[str, Any], *, errors: int = 0) -> Totals:
    requests = int(sums.get("requests") or 0)
    priced = int(sums.get("priced") or 0)
    latency = [int(sums.get(c) or 0) for c in LATENCY_COLUMNS]
    ttft = [int(sums.get(c) or 0) for c in TTFT_COLUMNS]
    return Totals(
        requests=requests,
        errors=errors,
        estimated=int(sums.get("estimated") or 0),
        prompt_tokens=int(sums.get("prompt_tokens") or 0),
        completion_tokens=int(sums.get("completion_tokens") or 0),
        total_tokens=int(sums.get("total_tokens") or 0),
        cached_tokens=int(sums.get("cached_tokens") or 0),
        reasoning_tokens=int(sums.get("reasoning_tokens") or 0),
        priced=priced,
        cost=round_cost(float(sums.get("cost") or 0.0)) if priced else None,
        latency_avg_ms=round(float(sums.get("latency_ms_sum") or 0.0) / requests, 1) if requests else None,
        latency_p50_ms=percentile(latency, 0.5),
        latency_p95_ms=percentile(latency, 0.95),
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p95_ms=percentile(ttft, 0.95),
    )


def _add(into: dict[str, Any], sums: Mapping[str, Any], names: Sequence[str]) -> None:
    have, get = into.get, sums.get
    for name in names:
        into[name] = have(name, 0) + (get(name) or 0)


def _error_kind(outcome: str | None, error_type: str | None) -> str:
    return error_type or outcome or "error"


# ---------------------------------------------------------------------------------------------------------
# Overview: the call


def overview(
    engine: Any,
    *,
    since: datetime,
    until: datetime,
    granularity: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    backend: str | None = None,
    top: int = DEFAULT_TOP,
) -> Overview:
    """The console's overview of [since, until): totals, a time series by hour or day (`granularity`,
    default by the range's length), errors by kind, breakdowns by model / key / backend / user / client IP
    and the top callers, filtered by key, model and backend (None: all).

    Raises ValueError for an empty or inverted range or an unknown granularity."""
    since, until = _aware(since), _aware(until)
    if until <= since:
        raise ValueError("the range is empty: 'until' must be after 'since'")
    granularity = granularity or choose_granularity(since, until)
    if granularity not in (HOUR, DAY):
        raise ValueError(f"granularity must be {HOUR!r} or {DAY!r}")
    top = max(1, min(int(top), 100))
    start, end = aligned_range(since, until, granularity)
    filters = {"key_id": key_id, "model": model, "backend": backend}
    with session_scope(engine) as session:
        rollups = RollupRepository(session)
        by_bucket, dims = _rollup_sums(rollups, granularity, start, end, filters, narrow=_NARROW)
        callers_since, callers_until = start, end
        if model is None and backend is None and end - start >= timedelta(days=1):
            callers_since, callers_until = aligned_range(start, end, DAY)
            users = rollups.caller_totals(callers_since, callers_until, ["user"], limit=top, key_id=key_id)
            ips = rollups.caller_totals(callers_since, callers_until, ["client_ip"], limit=top, key_id=key_id)
            callers = rollups.caller_totals(
                callers_since, callers_until, ["key_id", "user", "client_ip"], limit=top, key_id=key_id
            )
            source, complete = "rollup", True
        else:
            users, ips, callers, complete = _callers_from_log(session, start, end, filters, top)
            source = "log"
        key_ids = {r["key_id"] for r in dims["key"]} | {c["key_id"] for c in callers}
        names = _key_names(session, key_ids)

    series: dict[datetime, dict[str, Any]] = {}
    kinds: dict[tuple[str, str], int] = {}
    point_kinds: dict[datetime, dict[str, int]] = {}
    overall: dict[str, Any] = {}
    errors_total = 0
    point_errors: dict[datetime, int] = {}
    for row in by_bucket:
        bucket = row["bucket"]
        _add(series.setdefault(bucket, {}), row, _HISTOGRAM_SUMS)
        if row["outcome"] != "ok":
            n = int(row["requests"])
            kind = _error_kind(row["outcome"], row["error_type"])
            kinds[(kind, row["outcome"] or "error")] = kinds.get((kind, row["outcome"] or "error"), 0) + n
            per = point_kinds.setdefault(bucket, {})
            per[kind] = per.get(kind, 0) + n
            point_errors[bucket] = point_errors.get(bucket, 0) + n
            errors_total += n
    for sums in series.values():
        _add(overall, sums, _HISTOGRAM_SUMS)
    step = timedelta(hours=1) if granularity == HOUR else timedelta(days=1)
    points = []
    at = start
    while at < end:
        points.append(
            SeriesPoint(
                start=at,
                totals=_totals(series.get(at, {}), errors=point_errors.get(at, 0)),
                errors_by_kind=dict(sorted(point_kinds.get(at, {}).items())),
            )
        )
        at += step

    breakdowns = {
        name: _breakdown(rows, column, top, names if name == "key" else None)
        for name, column, rows in (
            ("model", "model", dims["model"]),
            ("key", "key_id", dims["key"]),
            ("backend", "backend", dims["backend"]),
        )
    }
    breakdowns["user"] = [_caller_row(r, "user") for r in users]
    breakdowns["client_ip"] = [_caller_row(r, "client_ip") for r in ips]
    return Overview(
        since=start,
        until=end,
        granularity=granularity,
        filters=filters,
        totals=_totals(overall, errors=errors_total),
        series=points,
        errors_by_kind=[
            ErrorKind(kind=k, outcome=o, requests=n)
            for (k, o), n in sorted(kinds.items(), key=lambda item: (-item[1], item[0]))
        ],
        breakdowns=breakdowns,
        top_callers=[
            Caller(
                key_id=c["key_id"],
                key_name=names.get(c["key_id"]) if c["key_id"] else None,
                user=c["user"],
                client_ip=c["client_ip"],
                requests=int(c["requests"]),
                errors=int(c["errors"]),
                total_tokens=int(c["total_tokens"]),
                cost=round_cost(float(c["cost"])) if c["priced"] else None,
            )
            for c in callers
        ],
        callers_source=source,
        callers_since=callers_since,
        callers_until=callers_until,
        callers_complete=complete,
    )


#: Whether an unfiltered overview reads the facet rollups (False: the wide ones, as filtered ones do; the
#: same numbers, which the tests check by reading both).
_NARROW = True


def _spans(granularity: str, start: datetime, end: datetime) -> list[tuple[str, datetime, datetime]]:
    """[start, end) as rollup reads for sums that need no bucket: the whole UTC days inside an hourly
    range from the daily rollup (one row per day instead of 24), its partial days by the hour."""
    if granularity == DAY:
        return [(DAY, start, end)]
    first, last = ceil_day(start), floor_day(end)
    if last <= first:
        return [(HOUR, start, end)]
    spans = [(DAY, first, last)]
    if start < first:
        spans.append((HOUR, start, first))
    if last < end:
        spans.append((HOUR, last, end))
    return spans


def _rollup_sums(
    rollups: RollupRepository,
    granularity: str,
    start: datetime,
    end: datetime,
    filters: dict[str, str | None],
    *,
    narrow: bool,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The series rows (by bucket, outcome and error type, with the histograms) and the model / key /
    backend breakdown rows (by value and outcome, scalar sums; several rows per value when read in
    spans) of an overview. Unfiltered (and `narrow`) from the facet rollups, a few rows per bucket;
    filtered from the wide ones, the breakdowns in one scan per span on PostgreSQL (grouping sets)."""
    spans = _spans(granularity, start, end)
    dims: dict[str, list[dict[str, Any]]] = {"model": [], "key": [], "backend": []}
    if narrow and all(v is None for v in filters.values()):
        by_bucket = rollups.facet_totals(
            granularity, start, end, "", ["bucket", "outcome", "error_type"], sums=_HISTOGRAM_SUMS
        )
        for name, column in (("model", "model"), ("key", "key_id"), ("backend", "backend")):
            for span in spans:
                dims[name] += rollups.facet_totals(*span, column, [column, "outcome"], sums=_SCALAR_SUMS)
        return by_bucket, dims
    by_bucket = rollups.totals(
        granularity, start, end, ["bucket", "outcome", "error_type"], sums=_HISTOGRAM_SUMS, **filters
    )
    for span_granularity, span_start, span_end in spans:
        by_model, by_key, by_backend = rollups.totals_sets(
            span_granularity,
            span_start,
            span_end,
            [["model", "outcome"], ["key_id", "outcome"], ["backend", "outcome"]],
            sums=_SCALAR_SUMS,
            **filters,
        )
        dims["model"] += by_model
        dims["key"] += by_key
        dims["backend"] += by_backend
    return by_bucket, dims


def _key_names(session: Any, key_ids: set[str | None]) -> dict[str, str]:
    wanted = {k for k in key_ids if k}
    if not wanted:
        return {}
    return {k.id: k.name for k in ApiKeyRepository(session).list() if k.id in wanted}


def _breakdown(
    rows: list[dict[str, Any]], column: str, top: int, names: Mapping[str, str] | None
) -> list[BreakdownRow]:
    merged: dict[str | None, dict[str, Any]] = {}
    for row in rows:
        acc = merged.setdefault(row[column], {"errors": 0})
        _add(acc, row, _SCALAR_SUMS)
        if row["outcome"] != "ok":
            acc["errors"] += int(row["requests"])
    ordered = sorted(merged.items(), key=lambda item: (-item[1]["requests"], item[0] or ""))[:top]
    out = []
    for value, acc in ordered:
        requests = int(acc["requests"])
        out.append(
            BreakdownRow(
                value=value,
                label=(names.get(value) if value else None) if names is not None else value,
                requests=requests,
                errors=int(acc["errors"]),
                prompt_tokens=int(acc["prompt_tokens"]),
                completion_tokens=int(acc["completion_tokens"]),
                total_tokens=int(acc["total_tokens"]),
                cost=round_cost(float(acc["cost"])) if acc["priced"] else None,
                latency_avg_ms=round(float(acc["latency_ms_sum"]) / requests, 1) if requests else None,
            )
        )
    return out


def _caller_row(row: Mapping[str, Any], column: str) -> BreakdownRow:
    return BreakdownRow(
        value=row[column],
        label=row[column],
        requests=int(row["requests"]),
        errors=int(row["errors"]),
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        total_tokens=int(row["total_tokens"]),
        cost=round_cost(float(row["cost"])) if row["priced"] else None,
    )


def _callers_from_log(
    session: Any, since: datetime, until: datetime, filters: Mapping[str, str | None], top: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], bool]:
    """User / client IP / caller breakdowns from the newest RAW_SCAN_LIMIT rows of the range."""
    log = RequestLog
    cost = getattr(log, "cost", None)
    inner = sa.select(
        log.key_id,
        log.user,
        log.client_ip,
        log.outcome,
        log.prompt_tokens,
        log.completion_tokens,
        log.total_tokens,
        (cost if cost is not None else sa.cast(sa.null(), sa.Float())).label("cost"),
    ).where(log.created_at >= since, log.created_at < until)
    for column, value in filters.items():
        if value is not None:
            inner = inner.where(getattr(log, column) == value)
    inner_q = inner.order_by(log.created_at.desc()).limit(RAW_SCAN_LIMIT + 1).subquery()
    scanned = int(session.scalar(sa.select(sa.func.count()).select_from(inner_q)) or 0)
    complete = scanned <= RAW_SCAN_LIMIT

    def grouped(columns: Sequence[str]) -> list[dict[str, Any]]:
        cols = [inner_q.c[c] for c in columns]
        stmt = (
            sa.select(
                *cols,
                sa.func.count().label("requests"),
                sa.func.sum(sa.case((inner_q.c.outcome != "ok", 1), else_=0)).label("errors"),
                sa.func.coalesce(sa.func.sum(inner_q.c.prompt_tokens), 0).label("prompt_tokens"),
                sa.func.coalesce(sa.func.sum(inner_q.c.completion_tokens), 0).label("completion_tokens"),
                sa.func.coalesce(sa.func.sum(inner_q.c.total_tokens), 0).label("total_tokens"),
                sa.func.count(inner_q.c.cost).label("priced"),
                sa.func.coalesce(sa.func.sum(inner_q.c.cost), 0).label("cost"),
            )
            .group_by(*cols)
            .order_by(sa.desc(sa.literal_column("requests")), *cols)
            .limit(top)
        )
        return [dict(r) for r in session.execute(stmt).mappings()]

    return grouped(["user"]), grouped(["client_ip"]), grouped(["key_id", "user", "client_ip"]), complete


# ---------------------------------------------------------------------------------------------------------
# Usage reports (/admin/usage, `llm-backend usage`)


def usage_report(
    engine: Any,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
    key_id: str | None = None,
    model: str | None = None,
    client_request_id: str | None = None,
    *,
    user_id: str | None = None,
    team_id: str | None = None,
) -> list[dict[str, Any]]:
    """Usage rows (one per group of key / model / day / user / backend / team / user_id) over [since, until)
    widened to whole UTC hours, as dicts with requests, errors, estimated and the token sums; grouped by
    key, each row names its key (`key_name`, None once deleted), by team its team (`team_name`), by
    user_id its user (`user_email`). `user` is the end user the client named; `user_id` the signed-in or
    trusted-front-end user (users.id), and `team_id`/`user_id` filter by them.

    From the hourly rollup (the daily one when grouping by day or the range is whole days); grouping by
    user from usage_callers_daily (whole UTC days; with a model filter from the log). A client request id
    names single requests, so that filter reads the log. Raises ValueError for an unknown group."""
    bad = set(group_by) - set(USAGE_GROUPS)
    if bad:
        raise ValueError(f"cannot group usage by {sorted(bad)}; choose from {USAGE_GROUPS}")
    keys = [g for g in USAGE_GROUPS if g in group_by]
    with session_scope(engine) as session:
        by_user = "user" in keys
        levels = {"user_id": user_id, "team_id": team_id}
        if client_request_id is not None or (
            by_user
            and (
                model is not None
                or user_id is not None
                or team_id is not None
                or any(k in keys for k in ("model", "backend", "team", "user_id"))
            )
        ):
            rows = _usage_from_log(session, since, until, keys, key_id, model, client_request_id, levels)
        elif by_user:
            rows = _usage_from_callers(session, since, until, keys, key_id)
        else:
            rows = _usage_from_rollups(session, since, until, keys, key_id, model, levels)
        names = _key_names(session, {r["key_id"] for r in rows}) if "key" in keys else {}
        teams, emails = _level_names(session, rows, keys)
    out = []
    for r in rows:
        row: dict[str, Any] = {
            "key_id": r.get("key_id") if "key" in keys else None,
            "model": r.get("model") if "model" in keys else None,
            "day": r.get("day") if "day" in keys else None,
            "user": r.get("user") if "user" in keys else None,
            "backend": r.get("backend") if "backend" in keys else None,
            **({"team_id": r.get("team_id") or None} if "team" in keys else {}),
            **({"user_id": r.get("user_id") or None} if "user_id" in keys else {}),
            **{f: int(r.get(f) or 0) for f in _USAGE_FIELDS},
            # the priced requests' cost sum; None when none of the group's requests had prices
            "cost": round_cost(r.get("cost")) if r.get("priced", 1) else None,
        }
        if "key" in keys:
            row = {
                "key_id": row["key_id"],
                "key_name": names.get(str(row["key_id"])) if row["key_id"] else None,
                **row,
            }
        if "team" in keys:
            row["team_name"] = teams.get(row["team_id"]) if row["team_id"] else None
        if "user_id" in keys:
            row["user_email"] = emails.get(row["user_id"]) if row["user_id"] else None
        out.append(row)
    return out


def _level_names(
    session: Any, rows: Sequence[dict[str, Any]], keys: Sequence[str]
) -> tuple[dict[str, str], dict[str, str | None]]:
    """Names of the teams and e-mail addresses of the users that rows grouped by team / user_id name."""
    from llm_backend.db.repositories import TeamRepository, UserRepository

    teams: dict[str, str] = {}
    emails: dict[str, str | None] = {}
    if "team" in keys:
        teams = {t.id: t.name for t in TeamRepository(session).list()}
    if "user_id" in keys:
        users = UserRepository(session)
        for uid in {r.get("user_id") for r in rows if r.get("user_id")}:
            user = users.get(str(uid))
            if user is not None:
                emails[user.id] = user.email
    return teams, emails


_USAGE_FIELDS = (
    "requests",
    "errors",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
)
_GROUP_COLUMN = {
    "key": "key_id",
    "model": "model",
    "user": "user",
    "backend": "backend",
    "team": "team_id",
    "user_id": "user_id",
}


def _usage_from_rollups(
    session: Any,
    since: datetime,
    until: datetime,
    keys: Sequence[str],
    key_id: str | None,
    model: str | None,
    levels: dict[str, str | None],
) -> list[dict[str, Any]]:
    start, end = aligned_range(since, until, HOUR)
    columns = [_GROUP_COLUMN[k] for k in keys if k != "day"]
    group = [*columns, "outcome"] + (["bucket"] if "day" in keys else [])
    rows = RollupRepository(session).totals(
        HOUR, start, end, group, sums=_USAGE_FIELDS_ROLLUP, key_id=key_id, model=model, **levels
    )
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        day = row["bucket"].strftime("%Y-%m-%d") if "day" in keys else None
        ident = (*(row[c] for c in columns), day)
        acc = merged.setdefault(ident, {**{c: row[c] for c in columns}, "day": day, "errors": 0})
        _add(acc, row, _USAGE_FIELDS_ROLLUP)
        if row["outcome"] != "ok":
            acc["errors"] += int(row["requests"])
    return [merged[k] for k in sorted(merged, key=lambda k: tuple("" if v is None else str(v) for v in k))]


_USAGE_FIELDS_ROLLUP = (*(f for f in _USAGE_FIELDS if f != "errors"), "priced", "cost")


def _usage_from_callers(
    session: Any, since: datetime, until: datetime, keys: Sequence[str], key_id: str | None
) -> list[dict[str, Any]]:
    start, end = aligned_range(since, until, DAY)
    columns = [_GROUP_COLUMN[k] for k in keys if k != "day"]
    group = columns + (["bucket"] if "day" in keys else [])
    rows = RollupRepository(session).caller_totals(start, end, group, order_by=None, key_id=key_id)
    out = []
    for row in rows:
        item = {**{c: row[c] for c in columns}, **{f: row.get(f, 0) for f in CALLER_SUMS}}
        item["day"] = row["bucket"].strftime("%Y-%m-%d") if "day" in keys else None
        out.append(item)
    return sorted(
        out, key=lambda r: tuple("" if r.get(c) is None else str(r.get(c)) for c in [*columns, "day"])
    )


def _usage_from_log(
    session: Any,
    since: datetime,
    until: datetime,
    keys: Sequence[str],
    key_id: str | None,
    model: str | None,
    client_request_id: str | None,
    levels: dict[str, str | None],
) -> list[dict[str, Any]]:
    from llm_backend.db.repositories import RequestLogRepository

    start, end = aligned_range(since, until, HOUR)
    rows = RequestLogRepository(session).usage_summary(
        since=start,
        until=end,
        group_by=keys,
        key_id=key_id,
        model=model,
        client_request_id=client_request_id,
        **levels,
    )
    return [dataclasses.asdict(r) for r in rows]


# ---------------------------------------------------------------------------------------------------------
# The request log page


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """What the request log page shows: rows created in [since, until) (None: unbounded) whose fields
    equal the given values (None: any). `outcome` is ok / error / client_disconnected / interrupted."""

    since: datetime | None = None
    until: datetime | None = None
    key_id: str | None = None
    model: str | None = None
    backend: str | None = None
    outcome: str | None = None
    status_code: int | None = None
    user: str | None = None
    client_ip: str | None = None
    request_id: str | None = None
    client_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class RequestPage:
    """One page of the request log, newest first: `items` are request dicts (see REQUEST_FIELDS plus
    "object": "request" and "created_at" as ISO 8601); `next_cursor` is None on the last page."""

    items: list[dict[str, Any]]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"object": "list", "data": self.items, "next_cursor": self.next_cursor}


#: Fields of a request dict on the request log page and in /admin/requests.
REQUEST_FIELDS = (
    "request_id",
    "client_request_id",
    "route",
    "operation",
    "status_code",
    "outcome",
    "error_type",
    "stream",
    "model_requested",
    "model",
    "provider",
    "backend",
    "deployment",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "tokens_estimated",
    "latency_ms",
    "ttft_ms",
    "key_id",
    "user",
    "client_ip",
    "conversation_id",
)


def encode_request_cursor(created_at: datetime, request_id: str) -> str:
    raw = json.dumps(["r", _aware(created_at).isoformat(), request_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_request_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, request_id) a cursor names; InvalidCursor when this code did not make it."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        tag, stamp, request_id = json.loads(raw)
        when = datetime.fromisoformat(stamp)
        if tag != "r" or not isinstance(request_id, str) or when.tzinfo is None:
            raise ValueError("bad cursor fields")
        return when, request_id
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidCursor("invalid pagination cursor") from exc


def request_to_dict(row: RequestLog) -> dict[str, Any]:
    out: dict[str, Any] = {"object": "request", **{f: getattr(row, f) for f in REQUEST_FIELDS}}
    out["created_at"] = _aware(row.created_at).isoformat()
    cost = getattr(row, "cost", None)
    if hasattr(row, "cost"):
        out["cost"] = cost
    return out


def request_page(
    engine: Any, filters: RequestFilter, *, limit: int = 50, cursor: str | None = None
) -> RequestPage:
    """Requests matching `filters`, newest first (created_at, then request_id, descending), `limit` per
    page (1..MAX_PAGE), after the row `cursor` names. Keyset pagination: no OFFSET, each page is an index
    range scan, and a row is never shown twice or skipped because others were inserted meanwhile.

    Raises InvalidCursor for a cursor this code did not make."""
    limit = max(1, min(int(limit), MAX_PAGE))
    stmt = sa.select(RequestLog)
    if filters.since is not None:
        stmt = stmt.where(RequestLog.created_at >= _aware(filters.since))
    if filters.until is not None:
        stmt = stmt.where(RequestLog.created_at < _aware(filters.until))
    for name in (
        "key_id",
        "model",
        "backend",
        "outcome",
        "status_code",
        "user",
        "client_ip",
        "request_id",
        "client_request_id",
    ):
        value = getattr(filters, name)
        if value is not None:
            stmt = stmt.where(getattr(RequestLog, name) == value)
    if cursor:
        when, last_id = decode_request_cursor(cursor)
        stmt = stmt.where(
            sa.or_(
                RequestLog.created_at < when,
                sa.and_(RequestLog.created_at == when, RequestLog.request_id < last_id),
            )
        )
    stmt = stmt.order_by(RequestLog.created_at.desc(), RequestLog.request_id.desc()).limit(limit + 1)
    with session_scope(engine) as session:
        rows = list(session.scalars(stmt))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_request_cursor(rows[-1].created_at, rows[-1].request_id)
    return RequestPage(items=[request_to_dict(r) for r in rows], next_cursor=next_cursor)


def request_detail(engine: Any, request_id: str) -> dict[str, Any] | None:
    """One request's record (as on the request log page) and, where content was recorded, the messages
    it sent and received (`messages`: the conversation's messages this request added, in order, or []);
    None when there is no such request."""
    with session_scope(engine) as session:
        row = session.get(RequestLog, request_id)
        if row is None:
            return None
        out = request_to_dict(row)
        messages: list[dict[str, Any]] = []
        if row.conversation_id:
            stmt = (
                sa.select(Message)
                .where(Message.conversation_id == row.conversation_id, Message.request_id == request_id)
                .order_by(Message.position)
            )
            messages = [{"position": m.position, **m.to_dict()} for m in session.scalars(stmt)]
        out["messages"] = messages
        return out
