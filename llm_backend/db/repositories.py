"""Repositories over a `Session`: request log (idempotent inserts, usage), conversations, api keys."""

from __future__ import annotations

import base64
import binascii
import bisect
import builtins
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from llm_backend.db.base import utcnow
from llm_backend.db.ids import new_uuid7
from llm_backend.db.models import (
    CALLER_DIMENSIONS,
    CALLER_SUMS,
    FACET_DIMENSIONS,
    FACETS,
    LATENCY_BOUNDS_MS,
    ROLLUP_DIMENSIONS,
    ROLLUP_SUMS,
    USAGE_CALLERS_DAILY,
    USAGE_DAILY,
    USAGE_FACETS_DAILY,
    USAGE_FACETS_HOURLY,
    USAGE_HOURLY,
    ApiKey,
    Conversation,
    Message,
    RequestLog,
    Team,
    TeamMember,
    User,
)
from llm_backend.recording.threading import normalize_message, transcript_hash

logger = logging.getLogger(__name__)

_REQUEST_LOG_COLUMNS = frozenset(c.name for c in RequestLog.__table__.columns)
# `user` is what the client wrote in the body's user field; `user_id` and `team` the user and team the
# request counted for.
USAGE_GROUPS = ("key", "model", "day", "user", "backend", "user_id", "team")


class InvalidCursor(ValueError):
    """A pagination cursor that this code did not produce."""


# ---------------------------------------------------------------------------------------------------------
# Request log


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals of one group of requests; group fields not asked for are None."""

    key_id: str | None
    model: str | None
    day: str | None  # YYYY-MM-DD (UTC)
    user: str | None
    backend: str | None
    requests: int
    errors: int
    estimated: int  # requests whose tokens were estimated
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    # the sum of the priced requests' costs; None when none of the group's requests had prices
    cost: float | None = None
    user_id: str | None = None
    team_id: str | None = None


def _request_filters(stmt: Any, since: datetime, until: datetime, **equal: str | None) -> Any:
    """`stmt` limited to rows created in [since, until) whose columns equal the given values (None: any)."""
    stmt = stmt.where(RequestLog.created_at >= since, RequestLog.created_at < until)
    for column, value in equal.items():
        if value is not None:
            stmt = stmt.where(getattr(RequestLog, column) == value)
    return stmt


class RequestLogRepository:
    """The request log: one row per request id, inserted idempotently, summarised for usage reports."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def existing_ids(self, request_ids: Iterable[str]) -> set[str]:
        """Which of `request_ids` already have a row."""
        ids = list(dict.fromkeys(request_ids))
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            stmt = sa.select(RequestLog.request_id).where(RequestLog.request_id.in_(chunk))
            found.update(self.session.scalars(stmt))
        return found

    def insert_ignore(self, rows: Sequence[Mapping[str, Any]], *, rollups: bool = True) -> set[str]:
        """Insert rows (column name → value); rows whose request_id exists already are left as they are.

        Returns the request ids this statement inserted (RETURNING: a row another transaction stored first
        is not among them). With `rollups`, exactly those rows are added to the usage rollups in the same
        transaction, so a replayed or retried record is never counted twice.
        """
        if not rows:
            return set()
        unknown = set().union(*(r.keys() for r in rows)) - _REQUEST_LOG_COLUMNS
        if unknown:
            raise ValueError(f"unknown request_log columns: {sorted(unknown)}")
        # Deduplicate within the batch (first one wins), like the database does across batches.
        unique = list({r["request_id"]: r for r in reversed(rows)}.values())[::-1]
        dialect = self.session.get_bind().dialect.name
        table: Any = RequestLog.__table__
        inserted: set[str]
        if dialect in ("postgresql", "sqlite"):
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            stmt = (
                insert(table)
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(table.c.request_id)
            )
            inserted = set(self.session.scalars(stmt, unique))
        else:  # portable fallback: skip what exists (not safe against concurrent writers of the same ids)
            existing = self.existing_ids(r["request_id"] for r in unique)
            new_rows = [r for r in unique if r["request_id"] not in existing]
            if new_rows:
                self.session.execute(sa.insert(table), new_rows)
            inserted = {r["request_id"] for r in new_rows}
        if rollups and inserted:
            RollupRepository(self.session).add(r for r in unique if r["request_id"] in inserted)
        return inserted

    def get(self, request_id: str) -> RequestLog | None:
        return self.session.get(RequestLog, request_id)

    def count(self) -> int:
        return int(self.session.scalar(sa.select(sa.func.count()).select_from(RequestLog)) or 0)

    def search(
        self,
        *,
        since: datetime,
        until: datetime,
        client_request_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[RequestLog]:
        """Rows over [since, until), newest first, filtered by the client's request id, key or model."""
        stmt = _request_filters(
            sa.select(RequestLog),
            since,
            until,
            key_id=key_id,
            model=model,
            client_request_id=client_request_id,
        )
        stmt = stmt.order_by(RequestLog.created_at.desc(), RequestLog.request_id.desc()).limit(limit)
        return builtins.list(self.session.scalars(stmt))

    def _day_expr(self) -> sa.ColumnElement[str]:
        if self.session.get_bind().dialect.name == "postgresql":
            return sa.func.to_char(sa.func.timezone("UTC", RequestLog.created_at), "YYYY-MM-DD")
        # SQLite stores UTC text "YYYY-MM-DD HH:MM:SS.ffffff"
        return sa.func.substr(RequestLog.created_at, 1, 10)

    def usage_summary(
        self,
        *,
        since: datetime,
        until: datetime,
        group_by: Sequence[str] = ("key", "model", "day"),
        key_id: str | None = None,
        model: str | None = None,
        client_request_id: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
    ) -> list[UsageRow]:
        """Token and request totals over [since, until), grouped by any of key/model/day/user/backend."""
        bad = set(group_by) - set(USAGE_GROUPS)
        if bad:
            raise ValueError(f"cannot group usage by {sorted(bad)}; choose from {USAGE_GROUPS}")
        group_cols: dict[str, Any] = {
            "key": RequestLog.key_id,
            "model": RequestLog.model,
            "day": self._day_expr(),
            "user": RequestLog.user,
            "backend": RequestLog.backend,
            "user_id": RequestLog.user_id,
            "team": RequestLog.team_id,
        }
        keys = [g for g in USAGE_GROUPS if g in group_by]
        labelled = [group_cols[g].label(g) for g in keys]

        def total(col: Any) -> sa.ColumnElement[int]:
            return sa.func.coalesce(sa.func.sum(col), 0)

        stmt = sa.select(
            *labelled,
            sa.func.count().label("requests"),
            total(sa.case((RequestLog.outcome != "ok", 1), else_=0)).label("errors"),
            total(sa.case((RequestLog.tokens_estimated, 1), else_=0)).label("estimated"),
            total(RequestLog.prompt_tokens).label("prompt_tokens"),
            total(RequestLog.completion_tokens).label("completion_tokens"),
            total(RequestLog.total_tokens).label("total_tokens"),
            total(RequestLog.cached_tokens).label("cached_tokens"),
            total(RequestLog.reasoning_tokens).label("reasoning_tokens"),
            sa.func.sum(RequestLog.cost).label("cost"),  # NULL (not 0) when no row of the group is priced
        )
        stmt = _request_filters(
            stmt,
            since,
            until,
            key_id=key_id,
            model=model,
            client_request_id=client_request_id,
            user_id=user_id,
            team_id=team_id,
        )
        if keys:
            stmt = stmt.group_by(*[group_cols[g] for g in keys]).order_by(*[group_cols[g] for g in keys])
        rows = []
        for row in self.session.execute(stmt).mappings():
            rows.append(
                UsageRow(
                    key_id=row.get("key"),
                    model=row.get("model"),
                    day=row.get("day"),
                    user=row.get("user"),
                    backend=row.get("backend"),
                    user_id=row.get("user_id"),
                    team_id=row.get("team"),
                    requests=int(row["requests"]),
                    errors=int(row["errors"]),
                    estimated=int(row["estimated"]),
                    prompt_tokens=int(row["prompt_tokens"]),
                    completion_tokens=int(row["completion_tokens"]),
                    total_tokens=int(row["total_tokens"]),
                    cached_tokens=int(row["cached_tokens"]),
                    reasoning_tokens=int(row["reasoning_tokens"]),
                    cost=float(row["cost"]) if row["cost"] is not None else None,
                )
            )
        return rows


# ---------------------------------------------------------------------------------------------------------
# Rollups (usage_hourly, usage_daily, usage_callers_daily, usage_facets_hourly, usage_facets_daily)

HOUR = "hour"
DAY = "day"
_ROLLUP_TABLES: dict[str, sa.Table] = {HOUR: USAGE_HOURLY, DAY: USAGE_DAILY}
_FACET_TABLES: dict[str, sa.Table] = {HOUR: USAGE_FACETS_HOURLY, DAY: USAGE_FACETS_DAILY}
_ALL_ROLLUPS = (USAGE_HOURLY, USAGE_DAILY, USAGE_CALLERS_DAILY, USAGE_FACETS_HOURLY, USAGE_FACETS_DAILY)
# where each facet's value sits in a (bucket, *ROLLUP_DIMENSIONS) key (None: the facet "" of all requests)
_FACET_AT = {f: (1 + ROLLUP_DIMENSIONS.index(f) if f else None) for f in FACETS}
_OUTCOME_AT = 1 + ROLLUP_DIMENSIONS.index("outcome")
_ERROR_AT = 1 + ROLLUP_DIMENSIONS.index("error_type")
_N_SUMS = len(ROLLUP_SUMS)
_SUM_INDEX = {name: i for i, name in enumerate(ROLLUP_SUMS)}
_LAT0 = _SUM_INDEX["latency_b00"]
_TTFT0 = _SUM_INDEX["ttft_b00"]
_N_CALLER_SUMS = len(CALLER_SUMS)


def floor_hour(when: datetime) -> datetime:
    """The start of the UTC hour `when` falls in (naive times are UTC)."""
    when = _aware(when).astimezone(UTC)
    return when.replace(minute=0, second=0, microsecond=0)


def floor_day(when: datetime) -> datetime:
    """The start (00:00 UTC) of the UTC day `when` falls in."""
    return floor_hour(when).replace(hour=0)


def _bucket_index(value: float) -> int:
    """The histogram bucket of a duration in ms: the first whose upper bound is not below it."""
    return bisect.bisect_left(LATENCY_BOUNDS_MS, value)


def _rollup_key_text(value: Any) -> str:
    return "" if value is None else str(value)


def accumulate(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[tuple[Any, ...], list[Any]], ...]:
    """The increments a set of request_log rows (as inserted) adds to the hourly, daily and caller rollups:
    three dicts of (bucket, *dimensions) -> sums in ROLLUP_SUMS / CALLER_SUMS order."""
    hourly: dict[tuple[Any, ...], list[Any]] = {}
    daily: dict[tuple[Any, ...], list[Any]] = {}
    callers: dict[tuple[Any, ...], list[Any]] = {}
    text = _rollup_key_text
    for row in rows:
        hour = floor_hour(row["created_at"])
        day = hour.replace(hour=0)
        dims = (
            text(row.get("model")),
            text(row.get("key_id")),
            text(row.get("backend")),
            text(row.get("operation")),
            text(row.get("outcome")),
            text(row.get("error_type")),
            text(row.get("team_id")),
            text(row.get("user_id")),
        )
        prompt = row.get("prompt_tokens") or 0
        completion = row.get("completion_tokens") or 0
        total = row.get("total_tokens") or 0
        cost = row.get("cost")
        latency = float(row.get("latency_ms") or 0.0)
        ttft = row.get("ttft_ms")
        lat_at = _LAT0 + _bucket_index(latency)
        for table, bucket in ((hourly, hour), (daily, day)):
            acc = table.get((bucket, *dims))
            if acc is None:
                acc = table[(bucket, *dims)] = [0] * _N_SUMS
            acc[0] += 1
            acc[1] += 1 if row.get("tokens_estimated") else 0
            acc[2] += prompt
            acc[3] += completion
            acc[4] += total
            acc[5] += row.get("cached_tokens") or 0
            acc[6] += row.get("reasoning_tokens") or 0
            if cost is not None:
                acc[7] += 1
                acc[8] += float(cost)
            acc[9] += latency
            if ttft is not None:
                acc[10] += 1
                acc[11] += float(ttft)
                acc[_TTFT0 + _bucket_index(float(ttft))] += 1
            acc[lat_at] += 1
        ckey = (day, dims[1], text(row.get("user")), text(row.get("client_ip")))
        cacc = callers.get(ckey)
        if cacc is None:
            cacc = callers[ckey] = [0] * _N_CALLER_SUMS
        cacc[0] += 1
        cacc[1] += 0 if row.get("outcome") == "ok" else 1
        cacc[2] += 1 if row.get("tokens_estimated") else 0
        cacc[3] += prompt
        cacc[4] += completion
        cacc[5] += total
        cacc[6] += row.get("cached_tokens") or 0
        cacc[7] += row.get("reasoning_tokens") or 0
        if cost is not None:
            cacc[8] += 1
            cacc[9] += float(cost)
    return hourly, daily, callers


def facets(rollup: Mapping[tuple[Any, ...], Sequence[Any]]) -> dict[tuple[Any, ...], list[Any]]:
    """The facet rollup's increments from the wide one's (`accumulate`'s hourly or daily dict): for each
    facet of FACETS, the sums by (bucket, facet, value, outcome, error_type)."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for key, sums in rollup.items():
        bucket, outcome, error_type = key[0], key[_OUTCOME_AT], key[_ERROR_AT]
        for facet, at in _FACET_AT.items():
            fkey = (bucket, facet, "" if at is None else key[at], outcome, error_type)
            acc = out.get(fkey)
            if acc is None:
                out[fkey] = list(sums)
            else:
                for i, v in enumerate(sums):
                    acc[i] += v
    return out


_UPSERTS: dict[tuple[str, str], Any] = {}


def _upsert(dialect: str, table: sa.Table, sums: Sequence[str]) -> Any:
    """INSERT … ON CONFLICT (primary key) DO UPDATE SET each sum = stored + new: atomic per row on both
    PostgreSQL (the conflicting row is locked, a concurrent writer's increment waits and then adds) and
    SQLite (one writer at a time)."""
    stmt = _UPSERTS.get((dialect, table.name))
    if stmt is None:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        ins = insert(table)
        stmt = ins.on_conflict_do_update(
            index_elements=[c.name for c in table.primary_key.columns],
            set_={name: table.c[name] + ins.excluded[name] for name in sums},
        )
        _UPSERTS[(dialect, table.name)] = stmt
    return stmt


class RollupRepository:
    """The usage rollups: increments from inserted request_log rows, rebuilds from the log, reads, pruning."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add request_log rows just inserted in this transaction to the rollups (upserts in key order,
        so concurrent writers lock rollup rows in one order and never deadlock on them)."""
        dialect = self.session.get_bind().dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise RuntimeError(f"rollups need PostgreSQL or SQLite, not {dialect}")
        hourly, daily, callers = accumulate(rows)
        for table, dims, sums, acc in (
            (USAGE_HOURLY, ROLLUP_DIMENSIONS, ROLLUP_SUMS, hourly),
            (USAGE_DAILY, ROLLUP_DIMENSIONS, ROLLUP_SUMS, daily),
            (USAGE_CALLERS_DAILY, CALLER_DIMENSIONS, CALLER_SUMS, callers),
            (USAGE_FACETS_HOURLY, FACET_DIMENSIONS, ROLLUP_SUMS, facets(hourly)),
            (USAGE_FACETS_DAILY, FACET_DIMENSIONS, ROLLUP_SUMS, facets(daily)),
        ):
            if not acc:
                continue
            names = ("bucket", *dims, *sums)
            params = [dict(zip(names, (*key, *values), strict=True)) for key, values in sorted(acc.items())]
            self.session.execute(_upsert(dialect, table, sums), params)

    def lock(self) -> None:
        """Hold off every recorder's rollup writes until this transaction ends (PostgreSQL: EXCLUSIVE locks
        conflict with the writers' ROW EXCLUSIVE; SQLite: the write transaction already excludes them)."""
        if self.session.get_bind().dialect.name == "postgresql":
            self.session.execute(
                sa.text(
                    "LOCK TABLE usage_hourly, usage_daily, usage_callers_daily, usage_facets_hourly,"
                    " usage_facets_daily IN EXCLUSIVE MODE"
                )
            )

    def rebuild(
        self, since: datetime | None = None, until: datetime | None = None, *, keep_pruned: bool = True
    ) -> int:
        """Recompute the rollups of whole UTC days in [since, until) (default: all) from request_log;
        returns the requests they now cover. Run it in a write transaction of its own: it locks the
        rollups, deletes those buckets and sums the log again with one INSERT … SELECT per table (the
        daily and facet rollups from the hourly / daily ones just rebuilt, which hold the same sums in
        far fewer rows than the log).

        With `keep_pruned` the days up to and including the oldest raw row's day are left as they are:
        their raw rows may have been pruned (in part), and the rollups are then all that is left of them.
        """
        self.lock()
        start = floor_day(since) if since else None
        end = None
        if until is not None:
            end = floor_day(until)
            if end != _aware(until).astimezone(UTC):
                end += timedelta(days=1)
        if keep_pruned:
            oldest = self.session.scalar(sa.select(sa.func.min(RequestLog.created_at)))
            if oldest is None:
                return 0
            first_whole = floor_day(_aware(oldest)) + timedelta(days=1)
            start = max(start, first_whole) if start else first_whole
        if start is not None and end is not None and end <= start:
            return 0
        for table in _ALL_ROLLUPS:
            stmt = sa.delete(table)
            if start is not None:
                stmt = stmt.where(table.c.bucket >= start)
            if end is not None:
                stmt = stmt.where(table.c.bucket < end)
            self.session.execute(stmt)
        log = RequestLog.__table__
        where = []
        if start is not None:
            where.append(log.c.created_at >= start)
        if end is not None:
            where.append(log.c.created_at < end)
        self.session.execute(_rebuild_rollup(self._dialect(), USAGE_HOURLY, HOUR, where))
        self.session.execute(_rebuild_daily(self._dialect(), start, end))
        self.session.execute(_rebuild_callers(self._dialect(), where))
        for granularity, table in _FACET_TABLES.items():
            for facet in FACETS:
                self.session.execute(_rebuild_facet(table, _ROLLUP_TABLES[granularity], facet, start, end))
        count = sa.select(sa.func.coalesce(sa.func.sum(USAGE_DAILY.c.requests), 0))
        if start is not None:
            count = count.where(USAGE_DAILY.c.bucket >= start)
        if end is not None:
            count = count.where(USAGE_DAILY.c.bucket < end)
        return int(self.session.scalar(count) or 0)

    def prune(self, before: datetime) -> int:
        """Delete rollup rows of buckets that start before `before` (whole hours / days); rows deleted."""
        deleted = 0
        for table, cutoff in (
            (USAGE_HOURLY, floor_hour(before)),
            (USAGE_DAILY, floor_day(before)),
            (USAGE_CALLERS_DAILY, floor_day(before)),
            (USAGE_FACETS_HOURLY, floor_hour(before)),
            (USAGE_FACETS_DAILY, floor_day(before)),
        ):
            result = self.session.execute(sa.delete(table).where(table.c.bucket < cutoff))
            deleted += int(getattr(result, "rowcount", 0) or 0)
        return deleted

    def _dialect(self) -> str:
        return self.session.get_bind().dialect.name

    def totals(
        self,
        granularity: str,
        since: datetime,
        until: datetime,
        group_by: Sequence[str],
        *,
        sums: Sequence[str] = ROLLUP_SUMS,
        **equal: str | None,
    ) -> list[dict[str, Any]]:
        """Sums of the rollup of `granularity` over buckets in [since, until), grouped by `bucket` and/or
        dimensions, filtered by dimension values (None: any; '' matches rows without one). Dimension values
        come back as None where the rollup holds ''."""
        table = _ROLLUP_TABLES[granularity]
        return _grouped(self.session, table, since, until, group_by, sums, equal)

    def facet_totals(
        self,
        granularity: str,
        since: datetime,
        until: datetime,
        facet: str,
        group_by: Sequence[str],
        *,
        sums: Sequence[str] = ROLLUP_SUMS,
    ) -> list[dict[str, Any]]:
        """`totals` over all requests (no filter) from the facet rollup of `granularity`: grouped by
        `bucket`, `outcome`, `error_type` and, for a facet other than "", by its dimension (named as in
        the wide rollup, e.g. "key_id"). The same rows as `totals` gives for that grouping, read from far
        fewer rollup rows."""
        if facet not in FACETS:
            raise ValueError(f"unknown facet {facet!r}")
        table = _FACET_TABLES[granularity]
        names = ["value" if g == facet else g for g in group_by]
        rows = _grouped(self.session, table, since, until, names, sums, {"facet": facet})
        if facet and facet in group_by:
            for row in rows:
                row[facet] = row.pop("value")
        return rows

    def totals_sets(
        self,
        granularity: str,
        since: datetime,
        until: datetime,
        sets: Sequence[Sequence[str]],
        *,
        sums: Sequence[str] = ROLLUP_SUMS,
        **equal: str | None,
    ) -> list[list[dict[str, Any]]]:
        """`totals` for several groupings at once, one result list per grouping: on PostgreSQL one scan of
        the range (GROUP BY GROUPING SETS), elsewhere one query per grouping."""
        table = _ROLLUP_TABLES[granularity]
        if self._dialect() != "postgresql" or len(sets) < 2:
            return [_grouped(self.session, table, since, until, g, sums, equal) for g in sets]
        columns = list(dict.fromkeys(c for g in sets for c in g))
        grouping = sa.func.grouping(*(table.c[c] for c in columns)).label("grouping_id")
        stmt = sa.select(
            *(table.c[c] for c in columns), grouping, *(sa.func.sum(table.c[s]).label(s) for s in sums)
        ).where(table.c.bucket >= since, table.c.bucket < until)
        for column, value in equal.items():
            if value is not None:
                stmt = stmt.where(table.c[column] == value)
        stmt = stmt.group_by(sa.func.grouping_sets(*(sa.tuple_(*(table.c[c] for c in g)) for g in sets)))
        # GROUPING() sets bit (n-1-i) for column i when it is not grouped in a row's set
        ids = {}
        for n, g in enumerate(sets):
            mask = 0
            for i, c in enumerate(columns):
                if c not in g:
                    mask |= 1 << (len(columns) - 1 - i)
            ids[mask] = n
        out: list[list[dict[str, Any]]] = [[] for _ in sets]
        for row in self.session.execute(stmt).mappings():
            n = ids[row["grouping_id"]]
            item = {c: row[c] for c in sets[n]}
            for c in sets[n]:
                if c == "bucket":
                    item[c] = _aware(item[c])
                elif item[c] == "":
                    item[c] = None
            for name in sums:
                item[name] = row[name] or 0
            out[n].append(item)
        for n, g in enumerate(sets):
            out[n].sort(key=_sort_key(g))
        return out

    def caller_totals(
        self,
        since: datetime,
        until: datetime,
        group_by: Sequence[str],
        *,
        order_by: str | None = "requests",
        limit: int | None = None,
        **equal: str | None,
    ) -> list[dict[str, Any]]:
        """Sums of usage_callers_daily over days in [since, until), grouped by key_id/user/client_ip,
        largest `order_by` first (at most `limit` groups)."""
        return _grouped(
            self.session, USAGE_CALLERS_DAILY, since, until, group_by, CALLER_SUMS, equal, order_by, limit
        )


def _sort_key(columns: Sequence[str]) -> Any:
    def key(row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple("" if row[c] is None else str(row[c]) for c in columns)

    return key


def _grouped(
    session: Session,
    table: sa.Table,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
    sums: Sequence[str],
    equal: Mapping[str, str | None],
    order_by: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    groups = [table.c[g] for g in group_by]
    stmt = sa.select(*groups, *(sa.func.sum(table.c[s]).label(s) for s in sums)).where(
        table.c.bucket >= since, table.c.bucket < until
    )
    for column, value in equal.items():
        if value is not None:
            stmt = stmt.where(table.c[column] == value)
    if groups:
        stmt = stmt.group_by(*groups)
    if order_by is not None:
        stmt = stmt.order_by(sa.desc(sa.literal_column(order_by)), *groups)
    elif groups:
        stmt = stmt.order_by(*groups)
    if limit is not None:
        stmt = stmt.limit(limit)
    out = []
    for row in session.execute(stmt).mappings():
        item = dict(row)
        for g in group_by:
            if g == "bucket":
                item[g] = _aware(item[g])
            elif item[g] == "":
                item[g] = None
        for s in sums:
            item[s] = item[s] or 0
        out.append(item)
    return out


def _bucket_expr(dialect: str, granularity: str, created: Any = None) -> Any:
    """The start of the bucket of `granularity` a time column (default: request_log.created_at) falls in."""
    if created is None:
        created = RequestLog.__table__.c.created_at
    if dialect == "postgresql":
        utc: Any = sa.literal_column("'UTC'")
        unit: Any = sa.literal_column(
            f"'{granularity}'"
        )  # literals: GROUP BY must repeat the same expression
        return sa.func.date_trunc(unit, sa.func.timezone(utc, created)).op("AT TIME ZONE")(utc)
    # SQLite keeps UTC text "YYYY-MM-DD HH:MM:SS.ffffff": the bucket start in the same form
    if granularity == HOUR:
        return sa.func.substr(created, 1, 13).concat(sa.literal_column("':00:00.000000'"))
    return sa.func.substr(created, 1, 10).concat(sa.literal_column("' 00:00:00.000000'"))


def _histogram_sums(column: Any, prefix: str) -> list[Any]:
    """Per-bucket counts of `column` (bucket i: above bound i-1, up to bound i; the last: above all)."""
    out = []
    lower: int | None = None
    for i, upper in enumerate((*LATENCY_BOUNDS_MS, None)):
        cond = []
        if lower is not None:
            cond.append(column > lower)
        if upper is not None:
            cond.append(column <= upper)
        out.append(
            sa.func.coalesce(sa.func.sum(sa.case((sa.and_(*cond), 1), else_=0)), 0).label(f"{prefix}{i:02d}")
        )
        lower = upper
    return out


def _log_dim(log: sa.FromClause, name: str) -> Any:
    """A request_log column as a rollup dimension: '' where the row has none (the upsert key needs a value)."""
    return sa.func.coalesce(log.c[name], sa.literal_column("''"))


def _log_total(col: Any) -> Any:
    return sa.func.coalesce(sa.func.sum(col), 0)


def _log_cost(log: sa.FromClause) -> Any:
    return log.c.cost if "cost" in log.c else sa.cast(sa.null(), sa.Float())


def _log_token_sums(log: sa.FromClause, cost: Any) -> list[Any]:
    """The sums every rollup rebuilt from request_log shares: estimated, the token kinds, priced and cost."""
    return [
        _log_total(sa.case((log.c.tokens_estimated, 1), else_=0)).label("estimated"),
        _log_total(log.c.prompt_tokens).label("prompt_tokens"),
        _log_total(log.c.completion_tokens).label("completion_tokens"),
        _log_total(log.c.total_tokens).label("total_tokens"),
        _log_total(log.c.cached_tokens).label("cached_tokens"),
        _log_total(log.c.reasoning_tokens).label("reasoning_tokens"),
        sa.func.count(cost).label("priced"),
        _log_total(cost).label("cost"),
    ]


def _rebuild_rollup(dialect: str, table: sa.Table, granularity: str, where: Sequence[Any]) -> Any:
    log = RequestLog.__table__
    bucket = _bucket_expr(dialect, granularity)
    cost = _log_cost(log)
    ttft = log.c.ttft_ms
    select = sa.select(
        bucket.label("bucket"),
        *(_log_dim(log, d).label(d) for d in ROLLUP_DIMENSIONS),
        sa.func.count().label("requests"),
        *_log_token_sums(log, cost),
        _log_total(log.c.latency_ms).label("latency_ms_sum"),
        sa.func.count(ttft).label("ttft_count"),
        _log_total(ttft).label("ttft_ms_sum"),
        *_histogram_sums(sa.func.coalesce(log.c.latency_ms, 0.0), "latency_b"),
        *_histogram_sums(ttft, "ttft_b"),
    ).where(*where)
    # in bucket order: a range of buckets then lies on few pages, as the recorder's writes in time order do
    select = select.group_by(bucket, *(_log_dim(log, d) for d in ROLLUP_DIMENSIONS)).order_by(bucket)
    return sa.insert(table).from_select(["bucket", *ROLLUP_DIMENSIONS, *ROLLUP_SUMS], select)


def _rebuild_daily(dialect: str, start: datetime | None, end: datetime | None) -> Any:
    """INSERT … SELECT of usage_daily's rows over days in [start, end) from usage_hourly's."""
    hourly = USAGE_HOURLY
    day = _bucket_expr(dialect, DAY, hourly.c.bucket)
    select = sa.select(
        day.label("bucket"),
        *(hourly.c[d] for d in ROLLUP_DIMENSIONS),
        *(sa.func.sum(hourly.c[s]).label(s) for s in ROLLUP_SUMS),
    )
    if start is not None:
        select = select.where(hourly.c.bucket >= start)
    if end is not None:
        select = select.where(hourly.c.bucket < end)
    select = select.group_by(day, *(hourly.c[d] for d in ROLLUP_DIMENSIONS)).order_by(day)
    return sa.insert(USAGE_DAILY).from_select(["bucket", *ROLLUP_DIMENSIONS, *ROLLUP_SUMS], select)


def _rebuild_facet(
    table: sa.Table, wide: sa.Table, facet: str, start: datetime | None, end: datetime | None
) -> Any:
    """INSERT … SELECT of one facet's rows over buckets in [start, end) from the wide rollup `wide`."""
    value: Any = wide.c[facet] if facet else sa.literal_column("''")
    select = sa.select(
        wide.c.bucket,
        sa.literal(facet, sa.String()).label("facet"),
        value.label("value"),
        wide.c.outcome,
        wide.c.error_type,
        *(sa.func.sum(wide.c[s]).label(s) for s in ROLLUP_SUMS),
    )
    if start is not None:
        select = select.where(wide.c.bucket >= start)
    if end is not None:
        select = select.where(wide.c.bucket < end)
    group = [wide.c.bucket, *([wide.c[facet]] if facet else []), wide.c.outcome, wide.c.error_type]
    select = select.group_by(*group).order_by(wide.c.bucket)
    return sa.insert(table).from_select(["bucket", *FACET_DIMENSIONS, *ROLLUP_SUMS], select)


def _rebuild_callers(dialect: str, where: Sequence[Any]) -> Any:
    log = RequestLog.__table__
    bucket = _bucket_expr(dialect, DAY)
    cost = _log_cost(log)
    select = sa.select(
        bucket.label("bucket"),
        *(_log_dim(log, d).label(d) for d in CALLER_DIMENSIONS),
        sa.func.count().label("requests"),
        _log_total(sa.case((log.c.outcome != "ok", 1), else_=0)).label("errors"),
        *_log_token_sums(log, cost),
    ).where(*where)
    select = select.group_by(bucket, *(_log_dim(log, d) for d in CALLER_DIMENSIONS)).order_by(bucket)
    return sa.insert(USAGE_CALLERS_DAILY).from_select(["bucket", *CALLER_DIMENSIONS, *CALLER_SUMS], select)


# ---------------------------------------------------------------------------------------------------------
# Conversations


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """One page of conversations, newest update first; `next_cursor` is None on the last page."""

    items: list[Conversation]
    next_cursor: str | None


def encode_cursor(updated_at: datetime, conversation_id: str) -> str:
    raw = json.dumps([updated_at.isoformat(), conversation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, conversation_id = json.loads(raw)
        when = datetime.fromisoformat(stamp)
        if not isinstance(conversation_id, str) or when.tzinfo is None:
            raise ValueError("bad cursor fields")
        return when, conversation_id
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidCursor("invalid pagination cursor") from exc


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ConversationRepository:
    """Conversations and their messages: CRUD, cursor pagination, appends, lookup by transcript hash.

    `owner` arguments of get/list/rename/delete filter when given (None: no filter, every caller sees all).
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(
        self,
        *,
        title: str | None = None,
        owner: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        conversation_id: str | None = None,
        created_at: datetime | None = None,
        external_id: str | None = None,
        parent_hash: str | None = None,
        team_id: str | None = None,
    ) -> Conversation:
        when = _aware(created_at) if created_at else utcnow()
        conv = Conversation(
            id=conversation_id or new_uuid7(),
            title=title,
            owner=owner,
            team_id=team_id,
            model=model,
            system_prompt=system_prompt,
            external_id=external_id,
            parent_hash=parent_hash,
            created_at=when,
            updated_at=when,
            prompt_tokens=0,
            completion_tokens=0,
            total_tokens=0,
            message_count=0,
            transcript_hash=None,
        )
        self.session.add(conv)
        self.session.flush()
        return conv

    def _owned(self, stmt: Any, owner: str | None, teams: Sequence[str] = ()) -> Any:
        """`stmt` confined to `owner`'s conversations and those of `teams` (None owner: no confinement)."""
        if owner is None:
            return stmt
        if teams:
            return stmt.where(sa.or_(Conversation.owner == owner, Conversation.team_id.in_(list(teams))))
        return stmt.where(Conversation.owner == owner)

    def get(
        self,
        conversation_id: str,
        *,
        owner: str | None = None,
        with_messages: bool = True,
        teams: Sequence[str] = (),
    ) -> Conversation | None:
        stmt = self._owned(sa.select(Conversation).where(Conversation.id == conversation_id), owner, teams)
        if with_messages:
            stmt = stmt.options(selectinload(Conversation.messages))
        return self.session.scalars(stmt).first()

    def get_by_external_id(self, external_id: str, *, owner: str | None) -> Conversation | None:
        """The conversation that `owner` (None: no owner) keys by the client's chat id `external_id`."""
        owner_clause = Conversation.owner.is_(None) if owner is None else Conversation.owner == owner
        stmt = (
            sa.select(Conversation)
            .where(Conversation.external_id == external_id, owner_clause)
            .options(selectinload(Conversation.messages))
        )
        return self.session.scalars(stmt).first()

    def messages(self, conversation_id: str) -> list[Message]:
        stmt = sa.select(Message).where(Message.conversation_id == conversation_id).order_by(Message.position)
        return list(self.session.scalars(stmt))

    def list(
        self,
        *,
        owner: str | None = None,
        model: str | Sequence[str] | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        q: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        teams: Sequence[str] = (),
    ) -> ConversationPage:
        """Conversations by (updated_at, id) descending; `q` searches titles case-insensitively.

        `model` is a name or several (a model and its aliases): a conversation recorded under any matches.
        """
        limit = max(1, min(int(limit), 1000))
        stmt = self._owned(sa.select(Conversation), owner, teams)
        if isinstance(model, str):
            stmt = stmt.where(Conversation.model == model)
        elif model is not None:
            stmt = stmt.where(Conversation.model.in_(list(model)))
        if created_from is not None:
            stmt = stmt.where(Conversation.created_at >= created_from)
        if created_to is not None:
            stmt = stmt.where(Conversation.created_at < created_to)
        if q:
            pattern = f"%{_escape_like(q.lower())}%"
            stmt = stmt.where(sa.func.lower(Conversation.title).like(pattern, escape="\\"))
        if cursor:
            when, last_id = decode_cursor(cursor)
            stmt = stmt.where(
                sa.or_(
                    Conversation.updated_at < when,
                    sa.and_(Conversation.updated_at == when, Conversation.id < last_id),
                )
            )
        stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit + 1)
        items = list(self.session.scalars(stmt))
        next_cursor = None
        if len(items) > limit:
            items = items[:limit]
            next_cursor = encode_cursor(items[-1].updated_at, items[-1].id)
        return ConversationPage(items=items, next_cursor=next_cursor)

    def rename(
        self, conversation_id: str, title: str, *, owner: str | None = None, teams: Sequence[str] = ()
    ) -> Conversation | None:
        conv = self.get(conversation_id, owner=owner, with_messages=False, teams=teams)
        if conv is None:
            return None
        conv.title = title
        conv.updated_at = utcnow()
        self.session.flush()
        return conv

    def delete(self, conversation_id: str, *, owner: str | None = None, teams: Sequence[str] = ()) -> bool:
        """Delete a conversation and (by cascade) its messages; False when there was none."""
        stmt = self._owned(sa.delete(Conversation).where(Conversation.id == conversation_id), owner, teams)
        result = self.session.execute(stmt.execution_options(synchronize_session=False))
        self.session.expire_all()
        return bool(getattr(result, "rowcount", 0))

    def append_messages(
        self,
        conversation: Conversation | str,
        messages: Sequence[Mapping[str, Any]],
        *,
        request_id: str | None = None,
        created_at: datetime | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        total_tokens: int = 0,
    ) -> builtins.list[Message]:
        """Append normalised messages after the last; update totals, count, updated_at, transcript hash."""
        conv = conversation if isinstance(conversation, Conversation) else self.get(conversation)
        if conv is None:
            raise LookupError(f"no conversation {conversation!r}")
        when = _aware(created_at) if created_at else utcnow()
        existing = list(conv.messages)  # loads them unless loaded; keeps the session's view current
        position = existing[-1].position + 1 if existing else 0
        added: list[Message] = []
        for raw in messages:
            msg = normalize_message(dict(raw))
            if "role" not in msg:
                raise ValueError("a message needs a role")
            added.append(
                Message(
                    position=position,
                    role=str(msg["role"]),
                    content=msg.get("content"),
                    name=msg.get("name"),
                    tool_calls=msg.get("tool_calls"),
                    tool_call_id=msg.get("tool_call_id"),
                    request_id=request_id,
                    created_at=when,
                )
            )
            position += 1
        conv.messages.extend(added)
        conv.prompt_tokens = (conv.prompt_tokens or 0) + prompt_tokens
        conv.completion_tokens = (conv.completion_tokens or 0) + completion_tokens
        conv.total_tokens = (conv.total_tokens or 0) + total_tokens
        conv.message_count = len(existing) + len(added)
        conv.updated_at = max(conv.updated_at, when) if conv.updated_at else when
        conv.transcript_hash = transcript_hash([m.to_dict() for m in [*existing, *added]])
        self.session.flush()
        return added

    def find_by_transcript_hash(
        self, hashes: str | Sequence[str], *, owner: str | None, unkeyed: bool = False
    ) -> Conversation | None:
        """The most recently updated conversation of `owner` (None matches no owner) with one of `hashes`.

        `unkeyed` considers only conversations without a client chat id (external_id).
        """
        wanted = [hashes] if isinstance(hashes, str) else list(hashes)
        if not wanted:
            return None
        owner_clause = Conversation.owner.is_(None) if owner is None else Conversation.owner == owner
        stmt = sa.select(Conversation).where(Conversation.transcript_hash.in_(wanted), owner_clause)
        if unkeyed:
            stmt = stmt.where(Conversation.external_id.is_(None))
        stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(1)
        return self.session.scalars(stmt).first()


# ---------------------------------------------------------------------------------------------------------
# API keys


def hash_api_key(secret: str) -> str:
    """The stored form of an api key: sha256 hex of the secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


_API_KEY_UPDATABLE = frozenset(
    {
        "name",
        "owner",
        "allowed_models",
        "rpm",
        "tpm",
        "max_parallel",
        "daily_tokens",
        "monthly_tokens",
        "period_tokens",
        "period_spend",
        "period_start",
        "period_end",
        "allowed_ips",
        "expires_at",
        "enabled",
        "team_id",
        "user_id",
        "trusted_ui",
    }
)


class ApiKeyRepository:
    """Api keys, looked up by id or by the hash of the presented secret."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(
        self,
        *,
        name: str,
        key_hash: str,
        key_prefix: str,
        owner: str | None = None,
        key_id: str | None = None,
        allowed_models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        daily_tokens: int | None = None,
        monthly_tokens: int | None = None,
        allowed_ips: list[str] | None = None,
        expires_at: datetime | None = None,
        enabled: bool = True,
        team_id: str | None = None,
        user_id: str | None = None,
        trusted_ui: bool = False,
        period_tokens: int | None = None,
        period_spend: float | None = None,
        period_start: datetime | None = None,
        period_end: datetime | None = None,
    ) -> ApiKey:
        key = ApiKey(
            name=name,
            key_hash=key_hash,
            key_prefix=key_prefix,
            owner=owner,
            allowed_models=allowed_models,
            rpm=rpm,
            tpm=tpm,
            max_parallel=max_parallel,
            daily_tokens=daily_tokens,
            monthly_tokens=monthly_tokens,
            allowed_ips=allowed_ips,
            expires_at=expires_at,
            enabled=enabled,
            team_id=team_id,
            user_id=user_id,
            trusted_ui=trusted_ui,
            period_tokens=period_tokens,
            period_spend=period_spend,
            period_start=period_start,
            period_end=period_end,
            created_at=utcnow(),
        )
        if key_id:
            key.id = key_id
        self.session.add(key)
        self.session.flush()
        return key

    def get(self, key_id: str) -> ApiKey | None:
        return self.session.get(ApiKey, key_id)

    def get_by_hash(self, key_hash: str) -> ApiKey | None:
        return self.session.scalars(sa.select(ApiKey).where(ApiKey.key_hash == key_hash)).first()

    def list(
        self, *, owner: str | None = None, enabled: bool | None = None, team_id: str | None = None
    ) -> list[ApiKey]:
        stmt = sa.select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if owner is not None:
            stmt = stmt.where(ApiKey.owner == owner)
        if team_id is not None:
            stmt = stmt.where(ApiKey.team_id == team_id)
        if enabled is not None:
            stmt = stmt.where(ApiKey.enabled.is_(enabled))
        return list(self.session.scalars(stmt))

    def update(self, key_id: str, **fields: Any) -> ApiKey | None:
        """Set the given fields (name, owner, limits, allowed_*, expires_at, enabled); None if no such key."""
        bad = set(fields) - _API_KEY_UPDATABLE
        if bad:
            raise ValueError(f"cannot update api key fields {sorted(bad)}")
        key = self.get(key_id)
        if key is None:
            return None
        for name, value in fields.items():
            setattr(key, name, value)
        self.session.flush()
        return key

    def delete(self, key_id: str) -> bool:
        result = self.session.execute(
            sa.delete(ApiKey).where(ApiKey.id == key_id).execution_options(synchronize_session=False)
        )
        self.session.expire_all()
        return bool(getattr(result, "rowcount", 0))

    def touch(self, key_id: str, when: datetime | None = None) -> None:
        """Record a use of the key (one UPDATE, no read)."""
        self.session.execute(
            sa.update(ApiKey)
            .where(ApiKey.id == key_id)
            .values(last_used_at=when or utcnow())
            .execution_options(synchronize_session=False)
        )


# ---------------------------------------------------------------------------------------------------------
# Teams and users

ORG_LIMIT_COLUMNS = (
    "allowed_models",
    "rpm",
    "tpm",
    "max_parallel",
    "daily_tokens",
    "monthly_tokens",
    "daily_spend",
    "monthly_spend",
    "period_tokens",
    "period_spend",
    "period_start",
    "period_end",
)
_TEAM_UPDATABLE = frozenset({"name", "groups", *ORG_LIMIT_COLUMNS})
_USER_UPDATABLE = frozenset({"email", "name", "enabled", *ORG_LIMIT_COLUMNS})


class TeamRepository:
    """Teams, by id or by name, and the teams that OIDC groups map to."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, *, name: str, **fields: Any) -> Team:
        bad = set(fields) - _TEAM_UPDATABLE
        if bad:
            raise ValueError(f"unknown team fields {sorted(bad)}")
        now = utcnow()
        team = Team(name=name, created_at=now, updated_at=now, **fields)
        self.session.add(team)
        self.session.flush()
        return team

    def get(self, team_id: str) -> Team | None:
        return self.session.get(Team, team_id)

    def get_by_name(self, name: str) -> Team | None:
        return self.session.scalars(sa.select(Team).where(Team.name == name)).first()

    def list(self) -> builtins.list[Team]:
        return builtins.list(self.session.scalars(sa.select(Team).order_by(Team.name, Team.id)))

    def with_groups(self) -> builtins.list[Team]:
        """Teams mapped to at least one OIDC group."""
        return [t for t in self.list() if t.groups]

    def update(self, team_id: str, **fields: Any) -> Team | None:
        bad = set(fields) - _TEAM_UPDATABLE
        if bad:
            raise ValueError(f"cannot update team fields {sorted(bad)}")
        team = self.get(team_id)
        if team is None:
            return None
        for name, value in fields.items():
            setattr(team, name, value)
        team.updated_at = utcnow()
        self.session.flush()
        return team

    def delete(self, team_id: str) -> bool:
        self.session.execute(sa.delete(TeamMember).where(TeamMember.team_id == team_id))
        result = self.session.execute(
            sa.delete(Team).where(Team.id == team_id).execution_options(synchronize_session=False)
        )
        self.session.expire_all()
        return bool(getattr(result, "rowcount", 0))

    def members(self, team_id: str) -> builtins.list[tuple[TeamMember, User]]:
        stmt = (
            sa.select(TeamMember, User)
            .join(User, User.id == TeamMember.user_id)
            .where(TeamMember.team_id == team_id)
            .order_by(User.email, User.id)
        )
        return [(m, u) for m, u in self.session.execute(stmt).tuples()]


class UserRepository:
    """Users by id or by (issuer, subject), and their team memberships."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, user_id: str) -> User | None:
        return self.session.get(User, user_id)

    def get_by_subject(self, issuer: str, subject: str) -> User | None:
        stmt = sa.select(User).where(User.issuer == issuer, User.subject == subject)
        return self.session.scalars(stmt).first()

    def create(self, *, issuer: str, subject: str, **fields: Any) -> User:
        user = User(issuer=issuer, subject=subject, created_at=utcnow(), **fields)
        self.session.add(user)
        self.session.flush()
        return user

    def list(
        self, *, team_id: str | None = None, q: str | None = None, limit: int = 1000
    ) -> builtins.list[User]:
        stmt = sa.select(User)
        if team_id is not None:
            stmt = stmt.join(TeamMember, TeamMember.user_id == User.id).where(TeamMember.team_id == team_id)
        if q:
            pattern = f"%{_escape_like(q.lower())}%"
            stmt = stmt.where(
                sa.or_(
                    sa.func.lower(User.email).like(pattern, escape="\\"),
                    sa.func.lower(User.name).like(pattern, escape="\\"),
                    User.subject == q,
                )
            )
        stmt = stmt.order_by(User.created_at, User.id).limit(max(1, min(int(limit), 10_000)))
        return builtins.list(self.session.scalars(stmt))

    def update(self, user_id: str, **fields: Any) -> User | None:
        bad = set(fields) - _USER_UPDATABLE - {"groups", "last_seen_at"}
        if bad:
            raise ValueError(f"cannot update user fields {sorted(bad)}")
        user = self.get(user_id)
        if user is None:
            return None
        for name, value in fields.items():
            setattr(user, name, value)
        self.session.flush()
        return user

    def memberships(self, user_id: str) -> builtins.list[tuple[TeamMember, Team]]:
        """The user's memberships with their teams, by team name."""
        stmt = (
            sa.select(TeamMember, Team)
            .join(Team, Team.id == TeamMember.team_id)
            .where(TeamMember.user_id == user_id)
            .order_by(Team.name, Team.id)
        )
        return [(m, t) for m, t in self.session.execute(stmt).tuples()]

    def set_membership(
        self,
        user_id: str,
        team_id: str,
        *,
        via_groups: bool | None = None,
        via_admin: bool | None = None,
        role: str | None = None,
    ) -> TeamMember | None:
        """Set where a membership comes from (None: unchanged); a membership from nowhere is removed."""
        member = self.session.get(TeamMember, (team_id, user_id))
        if member is None:
            if not via_groups and not via_admin:
                return None
            member = TeamMember(
                team_id=team_id,
                user_id=user_id,
                role=role or "member",
                via_groups=bool(via_groups),
                via_admin=bool(via_admin),
                created_at=utcnow(),
            )
            self.session.add(member)
            self.session.flush()
            return member
        if via_groups is not None:
            member.via_groups = via_groups
        if via_admin is not None:
            member.via_admin = via_admin
        if role is not None:
            member.role = role
        if not member.via_groups and not member.via_admin:
            self.session.delete(member)
            self.session.flush()
            return None
        self.session.flush()
        return member


# ---------------------------------------------------------------------------------------------------------
# Budget windows


def key_token_totals(
    session: Session, key_id: str, day_start: datetime, month_start: datetime
) -> tuple[int, int]:
    """Tokens a key used since `day_start` and since `month_start` (both UTC, one indexed range scan from the
    earlier of the two): what the limiter's budget counters are re-seeded from after they were lost."""
    since = min(day_start, month_start)
    total = RequestLog.total_tokens
    stmt = sa.select(
        sa.func.coalesce(sa.func.sum(sa.case((RequestLog.created_at >= day_start, total), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((RequestLog.created_at >= month_start, total), else_=0)), 0),
    ).where(RequestLog.key_id == key_id, RequestLog.created_at >= since)
    day, month = session.execute(stmt).one()
    return int(day or 0), int(month or 0)


#: The request log column each limiter level's usage is summed by.
LEVEL_COLUMNS = {"key": "key_id", "user": "user_id", "team": "team_id"}


def level_totals(
    session: Session, level: str, level_id: str, day_start: datetime, month_start: datetime
) -> tuple[int, int, float, float]:
    """Tokens and cost of one limiter level (a key, a user or a team) since `day_start` and `month_start`:
    what its budget counters are re-seeded from (cost 0 where the log holds none)."""
    column = getattr(RequestLog, LEVEL_COLUMNS[level])
    since = min(day_start, month_start)
    total = RequestLog.total_tokens
    cost = getattr(RequestLog, "cost", None)

    def summed(value: Any, start: datetime) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((RequestLog.created_at >= start, value), else_=0)), 0)

    cols = [summed(total, day_start), summed(total, month_start)]
    if cost is not None:
        cols += [summed(cost, day_start), summed(cost, month_start)]
    row = session.execute(sa.select(*cols).where(column == level_id, RequestLog.created_at >= since)).one()
    day_cost = float(row[2] or 0.0) if cost is not None else 0.0
    month_cost = float(row[3] or 0.0) if cost is not None else 0.0
    return int(row[0] or 0), int(row[1] or 0), day_cost, month_cost


def period_totals(
    session: Session, level: str, level_id: str, start: datetime | None, end: datetime
) -> tuple[int, float]:
    """Tokens and cost of one limiter level within a budget period [start, end) (start None: no lower
    bound): what its period counter is re-seeded from (cost 0 where the log holds none)."""
    column = getattr(RequestLog, LEVEL_COLUMNS[level])
    cost = getattr(RequestLog, "cost", None)
    cols = [sa.func.coalesce(sa.func.sum(RequestLog.total_tokens), 0)]
    if cost is not None:
        cols.append(sa.func.coalesce(sa.func.sum(cost), 0))
    where = [column == level_id, RequestLog.created_at < end]
    if start is not None:
        where.append(RequestLog.created_at >= start)
    row = session.execute(sa.select(*cols).where(*where)).one()
    return int(row[0] or 0), float(row[1] or 0.0) if cost is not None else 0.0
