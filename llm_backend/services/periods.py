"""Budget periods of keys, users and teams: admin input (period_tokens, period_spend, period_start,
period_end) validated, completed (the start defaults to the moment it is set) and shown."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from llm_backend.errors import InvalidRequest

PERIOD_FIELDS = ("period_tokens", "period_spend", "period_start", "period_end")
INT_MAX = 2**53  # exact in a double (Lua) and in JSON
SPEND_MAX = 1e9  # millionths of it stay exact in a double


def _bad(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=field, code="invalid_value")


def parse_when(value: Any, field: str) -> datetime:
    """An ISO 8601 time (no zone: UTC) or date (00:00 UTC), or `now`, as an aware UTC datetime."""
    text = value.strip() if isinstance(value, str) else None
    if not text or len(text) > 64:
        raise _bad(
            field, f"'{field}' must be an ISO 8601 date or time (e.g. 2027-01-01 or 2027-01-01T08:00Z)."
        )
    if text.lower() == "now":
        return datetime.now(UTC)
    try:
        if len(text) <= 10 and "T" not in text.upper():
            when = datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        else:
            parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
            when = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        when.timestamp()  # a time at the very edge of the calendar has no timestamp
    except (ValueError, OverflowError, OSError):
        raise _bad(
            field,
            f"'{field}' must be an ISO 8601 date or time (e.g. 2027-01-01 or 2027-01-01T08:00Z), "
            f"not {text[:40]!r}.",
        ) from None
    return when


def clean_count(field: str, value: Any, *, none: str = "no limit") -> int | None:
    """A whole number of admin input (tokens, requests) from 0 to INT_MAX, or None."""
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT_MAX
    ):
        raise _bad(field, f"'{field}' must be a whole number from 0 to {INT_MAX}, or null for {none}.")
    return value


def clean_amount(field: str, value: Any, *, none: str = "no limit") -> float | None:
    """An amount of money of admin input (a number, or the CLI's text of one) from 0 to SPEND_MAX, or None."""
    if isinstance(value, str):  # the CLI passes amounts as text
        try:
            value = float(value)
        except ValueError:
            value = "bad"
    if value is not None and (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= SPEND_MAX
    ):
        raise _bad(
            field,
            f"'{field}' must be an amount from 0 to {SPEND_MAX:.0f} (in the currency of the models' prices), "
            f"or null for {none}.",
        )
    return float(value) if value is not None else None


def clean_period(data: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Validate the period fields present in admin input into `out` (each on its own; see complete_period
    for the rules between them). null clears a field."""
    if "period_tokens" in data:
        out["period_tokens"] = clean_count("period_tokens", data["period_tokens"], none="none")
    if "period_spend" in data:
        out["period_spend"] = clean_amount("period_spend", data["period_spend"], none="none")
    for field in ("period_start", "period_end"):
        if field in data:
            value = data[field]
            out[field] = None if value is None else parse_when(value, field)


def _aware(when: datetime | None) -> datetime | None:
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


def complete_period(current: Any, fields: dict[str, Any], now: datetime | None = None) -> None:
    """Check the period fields of a create (current None) or an update of `current` (a row) as they will
    be, and fill in what follows from them:

    - a period budget (period_tokens or period_spend) needs period_end;
    - period_start defaults to now when a period is set without one;
    - period_end must be after period_start;
    - a period left with neither budget nor end loses its start too (a later period starts afresh).
    """
    if not any(f in fields for f in PERIOD_FIELDS):
        return
    final = {f: fields[f] if f in fields else getattr(current, f, None) for f in PERIOD_FIELDS}
    start, end = _aware(final["period_start"]), _aware(final["period_end"])
    budget = final["period_tokens"] is not None or final["period_spend"] is not None
    if budget and end is None:
        raise _bad(
            "period_end",
            "A period budget (period_tokens or period_spend) needs 'period_end' (ISO 8601; exclusive).",
        )
    if end is None:
        if not budget and start is not None and "period_start" not in fields:
            fields["period_start"] = None
        return
    if start is None:
        start = fields["period_start"] = now or datetime.now(UTC)
    if end <= start:
        raise _bad(
            "period_end",
            f"'period_end' ({end.isoformat()}) must be after 'period_start' ({start.isoformat()}).",
        )


def period_public(row: Any) -> dict[str, Any]:
    """The period fields as the admin API, the CLI and the console show them."""

    def iso(when: datetime | None) -> str | None:
        when = _aware(when)
        return when.isoformat() if when is not None else None

    return {
        "period_tokens": row.period_tokens,
        "period_spend": row.period_spend,
        "period_start": iso(row.period_start),
        "period_end": iso(row.period_end),
    }


def period_limits(row: Any) -> dict[str, Any]:
    """The period fields of a row as KeyLimits arguments (UTC timestamps)."""
    start, end = _aware(row.period_start), _aware(row.period_end)
    return {
        "period_tokens": row.period_tokens,
        "period_spend": row.period_spend,
        "period_start": start.timestamp() if start is not None else None,
        "period_end": end.timestamp() if end is not None else None,
    }
