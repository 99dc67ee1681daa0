"""The data of the console's pages, from the same services the admin API uses (no query of its own)."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from llm_backend.db.repositories import period_totals
from llm_backend.db.session import session_scope
from llm_backend.errors import InvalidRequest
from llm_backend.services.usage import usage_report

LIMIT_FIELDS = ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens", "period_tokens")
#: the budget period's other fields, passed on as typed (the key service checks them); empty means none
PERIOD_TEXT = ("period_spend", "period_start", "period_end")
PAGE_SIZE = 50  # request log rows per page
RECENT = timedelta(hours=1)  # a backend's "recent" error rate: the request log's rollups since then


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def _split_list(raw: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,\s]+", raw) if p.strip()]


def key_body(form: Mapping[str, Any], *, creating: bool) -> dict[str, Any]:
    """A key form's fields (all text) as the admin API's key body: lists split on commas or white space,
    empty limits meaning none; InvalidRequest naming a field that is not a whole number."""
    body: dict[str, Any] = {}
    text = {k: str(v).strip() for k, v in form.items() if isinstance(v, str | int)}
    if creating or "name" in text:
        body["name"] = text.get("name", "")
    if "owner" in text:
        body["owner"] = text["owner"] or None
    if "models" in text:
        body["models"] = _split_list(text["models"]) or None
    if "allowed_ips" in text:
        body["allowed_ips"] = _split_list(text["allowed_ips"]) or None
    for field in LIMIT_FIELDS:
        if field not in text:
            continue
        raw = text[field].replace("_", "").replace(",", "")
        if not raw:
            body[field] = None
            continue
        if not raw.isdigit():
            raise InvalidRequest(
                f"'{field}' must be a whole number >= 0, or empty for no limit.", param=field
            )
        body[field] = int(raw)
    for field in PERIOD_TEXT:
        if field in text:
            body[field] = text[field] or None
    expires_in = text.get("expires_in", "")
    expires_at = text.get("expires_at", "")
    if expires_in:
        body["expires_in"] = expires_in
    elif expires_at:
        body["expires_at"] = expires_at if re.search(r"(Z|[+-]\d\d:?\d\d)$", expires_at) else expires_at + "Z"
    elif not creating and "expires_at" in text:
        body["expires_at"] = None
    if not creating:
        body["enabled"] = text.get("enabled") in ("on", "true", "1")
    return body


def key_rows(store: Any, engine: Any, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every key with its tokens and requests today and this month (UTC) and what is left of its budgets."""
    now = now or datetime.now(UTC)
    keys = store.list()
    today = {r["key_id"]: r for r in usage_report(engine, day_start(now), now, ["key"])}
    month = {r["key_id"]: r for r in usage_report(engine, month_start(now), now, ["key"])}
    rows = []
    for key in keys:
        d, m = today.get(key["id"], {}), month.get(key["id"], {})
        used_day, used_month = int(d.get("total_tokens", 0)), int(m.get("total_tokens", 0))
        expired = bool(key["expires_at"]) and datetime.fromisoformat(key["expires_at"]) <= now
        rows.append(
            {
                **key,
                "requests_today": int(d.get("requests", 0)),
                "requests_month": int(m.get("requests", 0)),
                "tokens_today": used_day,
                "tokens_month": used_month,
                "daily_left": None if key["daily_tokens"] is None else max(0, key["daily_tokens"] - used_day),
                "monthly_left": None
                if key["monthly_tokens"] is None
                else max(0, key["monthly_tokens"] - used_month),
                "expired": expired,
                "status": "disabled" if not key["enabled"] else "expired" if expired else "active",
                **_period_left(engine, key),
            }
        )
    return rows


def _period_left(engine: Any, key: Mapping[str, Any]) -> dict[str, Any]:
    """What is left of a key's period budget (tokens and money), counted exactly from the request log over
    the period, as the limiter re-seeds it; None for an amount the key has no period budget in."""
    if not key.get("period_end") or (key.get("period_tokens") is None and key.get("period_spend") is None):
        return {"period_left_tokens": None, "period_left_spend": None}
    start = datetime.fromisoformat(key["period_start"]) if key.get("period_start") else None
    with session_scope(engine) as session:
        tokens, cost = period_totals(
            session, "key", key["id"], start, datetime.fromisoformat(key["period_end"])
        )
    return {
        "period_left_tokens": None if key["period_tokens"] is None else max(0, key["period_tokens"] - tokens),
        "period_left_spend": None if key["period_spend"] is None else max(0.0, key["period_spend"] - cost),
    }


def backend_rows(router: Any, engine: Any, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each model's backends: this worker's live routing state and the request log's recent error rate."""
    now = now or datetime.now(UTC)
    recent: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    if engine is not None:
        for r in usage_report(engine, now - RECENT, now, ["model", "backend"]):  # whole hours
            recent[(r["model"], r["backend"])] = r
    rows = []
    for s in router.snapshot():
        state = str(s["state"])
        if float(s["cooldown_remaining_s"] or 0) > 0:
            live = "cooling_down"
        elif state.startswith("half_open"):
            live = "half_open"
        elif state == "open":
            live = "open"
        else:
            live = "healthy"
        r = recent.get((s["model"], s["backend"]), {})
        requests = int(r.get("requests", 0))
        rows.append(
            {
                **s,
                "live": live,
                "recent_requests": requests,
                "recent_errors": int(r.get("errors", 0)),
                "recent_error_rate": (int(r.get("errors", 0)) / requests) if requests else None,
            }
        )
    return rows


RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
MAX_CUSTOM = timedelta(days=366)
MAX_HOURLY = timedelta(days=31)


def _parse_when(text: str | None, *, end: bool = False) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    try:
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        if end and len(text.strip()) == 10:
            when += timedelta(days=1)
    except OverflowError:
        return None
    # records exist between these years; outside them a bucket boundary could not even be computed
    return when if 1970 <= when.year <= 9000 else None


@dataclass(frozen=True, slots=True)
class Window:
    """The time range a page shows: a preset (24h, 7d, 30d) or a custom one, and its chart bucket."""

    range: str
    start: datetime
    end: datetime
    bucket: str  # hour | day
    since_text: str = ""
    until_text: str = ""
    error: str | None = None

    @classmethod
    def parse(
        cls,
        range_: str | None,
        since: str | None,
        until: str | None,
        bucket: str | None,
        now: datetime | None = None,
    ) -> Window:
        now = now or datetime.now(UTC)
        error = None
        name = (range_ or "24h").strip()
        if name == "custom" or (range_ is None and (since or until)):
            start, end = _parse_when(since), _parse_when(until, end=True) or now
            if start is None or end <= start:
                error = "The custom range needs a start before its end (dates or times in UTC)."
                name, start, end = "24h", now - RANGES["24h"], now
            elif end - start > MAX_CUSTOM:
                error = "A custom range is at most 366 days long; showing its last 366 days."
                start = end - MAX_CUSTOM
                name = "custom"
            else:
                name = "custom"
        else:
            if name not in RANGES:
                error = f"Unknown range {name[:20]!r}; showing the last 24 hours."
                name = "24h"
            start, end = now - RANGES[name], now
        span = end - start
        chosen = bucket if bucket in ("hour", "day") else ("hour" if span <= RANGES["7d"] else "day")
        if chosen == "hour" and span > MAX_HOURLY:
            chosen = "day"
        return cls(name, start, end, chosen, since or "", until or "", error)

    @property
    def hourly(self) -> bool:
        return self.bucket == "hour"

    def buckets(self) -> list[datetime]:
        """The start of every bucket that overlaps the window, oldest first."""
        step = timedelta(hours=1) if self.hourly else timedelta(days=1)
        first = self.start.replace(minute=0, second=0, microsecond=0)
        if not self.hourly:
            first = first.replace(hour=0)
        out = []
        at = first
        while at < self.end:
            out.append(at)
            at += step
        return out


def overview(engine: Any, window: Window, filters: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """The overview page: services/analytics.py's overview of the window, with its charts drawn."""
    from llm_backend.console.charts import Bar, Series, bar_chart, time_chart
    from llm_backend.services.analytics import overview as analytics_overview

    f = filters or {}
    data = analytics_overview(
        engine,
        since=window.start,
        until=window.end,
        granularity=window.bucket,
        key_id=f.get("key_id"),
        model=f.get("model"),
        backend=f.get("backend"),
    )
    buckets = [p.start for p in data.series]
    hourly = data.granularity == "hour"

    def col(name: str, *, zero_is_none: bool = False) -> list[float | None]:
        out: list[float | None] = []
        for p in data.series:
            v = getattr(p.totals, name)
            out.append(None if v is None or (zero_is_none and not v) else float(v))
        return out

    kinds = [e.kind for e in data.errors_by_kind]
    charts = [
        time_chart(
            "Requests",
            buckets,
            [Series("requests", col("requests")), Series("errors", col("errors"))],
            hourly=hourly,
            kind="bars",
        ),
        time_chart(
            "Tokens",
            buckets,
            [
                Series("prompt", col("prompt_tokens")),
                Series("completion", col("completion_tokens")),
                Series("cached", col("cached_tokens")),
                Series("reasoning", col("reasoning_tokens")),
            ],
            hourly=hourly,
        ),
        time_chart(
            "Latency",
            buckets,
            [Series("p50", col("latency_p50_ms")), Series("p95", col("latency_p95_ms"))],
            unit="ms",
            hourly=hourly,
        ),
        time_chart(
            "Time to first token (streams)",
            buckets,
            [Series("p50", col("ttft_p50_ms")), Series("p95", col("ttft_p95_ms"))],
            unit="ms",
            hourly=hourly,
        ),
    ]
    if data.totals.cost is not None:
        charts.append(time_chart("Spend", buckets, [Series("spend", col("cost"))], unit="$", hourly=hourly))
    if kinds:
        charts.append(
            time_chart(
                "Errors by kind",
                buckets,
                [
                    Series(kind, [float(p.errors_by_kind.get(kind, 0)) for p in data.series])
                    for kind in list(dict.fromkeys(kinds))[:6]
                ],
                hourly=hourly,
                kind="bars",
            )
        )
    breakdowns = []
    for name, title in (
        ("model", "By model"),
        ("key", "By key"),
        ("user", "By end user"),
        ("client_ip", "By client IP"),
        ("backend", "By backend"),
    ):
        rows = data.breakdowns.get(name, [])
        bars = [
            Bar(
                r.label or r.value or "(none)",
                r.requests,
                note=f"· {r.total_tokens:,} tokens" + (f" · {r.errors} errors" if r.errors else ""),
            )
            for r in rows
        ]
        breakdowns.append(
            {"name": name, "title": title, "chart": bar_chart(f"Requests {title.lower()}", bars)}
        )
    top = [
        {
            "label": " · ".join(
                x for x in (c.key_name or c.key_id or "no key", c.user or "", c.client_ip or "") if x
            ),
            "requests": c.requests,
            "total_tokens": c.total_tokens,
            "cost": c.cost,
            "errors": c.errors,
        }
        for c in data.top_callers
    ]
    errors = [
        {
            "kind": e.kind,
            "outcome": e.outcome,
            "requests": e.requests,
            "query": urlencode({"range": window.range, "outcome": e.outcome}),
        }
        for e in data.errors_by_kind
    ]
    return {
        "totals": dataclasses.asdict(data.totals),
        "charts": [{"title": _svg_title(c), "svg": c} for c in charts],
        "breakdowns": breakdowns,
        "errors": errors,
        "top": top,
        "since": data.since,
        "until": data.until,
        "callers_complete": data.callers_complete,
    }


def _svg_title(svg: str) -> str:
    """A chart's own <title> text, for the caption above it."""
    match = re.search(r'<title id="[^"]+">([^<]*)</title>', svg)
    return html.unescape(match.group(1)) if match else ""


def request_log(
    engine: Any, window: Window, filters: Mapping[str, str], cursor: str | None
) -> dict[str, Any]:
    """A page of the request log (services/analytics.py's keyset pages); the request id filter matches our
    id or, when none has it, the id the client sent."""
    from llm_backend.services.analytics import InvalidCursor, RequestFilter, request_page

    status = filters.get("status")
    if status is not None and not status.isdigit():
        raise InvalidRequest("'status' must be an HTTP status such as 429.", param="status")
    base = RequestFilter(
        since=window.start,
        until=window.end,
        key_id=filters.get("key_id"),
        model=filters.get("model"),
        backend=filters.get("backend"),
        outcome=filters.get("outcome"),
        status_code=int(status) if status else None,
        user=filters.get("user"),
        client_ip=filters.get("client_ip"),
    )
    wanted = filters.get("request_id")
    try:
        if wanted:
            page = request_page(engine, dataclasses.replace(base, request_id=wanted), limit=PAGE_SIZE)
            if not page.items:
                page = request_page(
                    engine,
                    dataclasses.replace(base, client_request_id=wanted),
                    limit=PAGE_SIZE,
                    cursor=cursor,
                )
        else:
            page = request_page(engine, base, limit=PAGE_SIZE, cursor=cursor)
    except InvalidCursor:
        raise InvalidRequest("Invalid pagination cursor.", param="cursor") from None
    return {"data": page.items, "next_cursor": page.next_cursor}
