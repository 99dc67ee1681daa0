"""Framework-free rate-limit types: per-key limits, header state, reservations and the Limiter interface."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Self

LimitKind = Literal[
    "requests",
    "tokens",
    "parallel",
    "daily_budget",
    "monthly_budget",
    "daily_spend",
    "monthly_spend",
    "period_budget",
    "period_spend",
    "period_not_started",
    "period_ended",
]
LevelKind = Literal["key", "user", "team"]

#: Length of the RPM/TPM window in seconds. Implementations take it as a constructor argument so that
#: tests can use a one-second window instead of sleeping for a minute.
DEFAULT_RATE_WINDOW_S = 60.0
#: How long a request's in-flight lease (its parallel slot) lasts when nobody renews it: the limiter renews
#: the leases of its live requests every lease/3 seconds, so a long stream keeps its slot, and the slot of a
#: request whose worker died (or whose settle could not reach the store) frees within this time.
DEFAULT_LEASE_S = 30.0
#: Retry hint for a full set of parallel slots: the time a slot frees up is unknown.
PARALLEL_RETRY_AFTER_S = 1.0
#: Float tolerance when comparing token/request levels against a limit.
EPSILON = 1e-6
#: The "wait" of a refusal that waiting does not cure (a spent or ended budget period): longer than any
#: other, so that it is the one reported; it never becomes a Retry-After.
NEVER_S = 1e15


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The limits of one API key; None means unlimited."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute
    max_parallel: int | None = None  # concurrent in-flight requests
    daily_tokens: int | None = None  # budget per UTC day
    monthly_tokens: int | None = None  # budget per UTC calendar month
    daily_spend: float | None = None  # money budget per UTC day, in the currency of the models' prices
    monthly_spend: float | None = None  # money budget per UTC calendar month
    period_tokens: int | None = None  # token budget for the fixed period [period_start, period_end)
    period_spend: float | None = None  # money budget for that period
    period_start: float | None = None  # UTC timestamps; None start: the period has no lower bound
    period_end: float | None = None  # exclusive; a period budget without an end is not in force

    def unlimited(self) -> bool:
        return not self.has_period() and all(
            v is None
            for v in (
                self.rpm,
                self.tpm,
                self.max_parallel,
                self.daily_tokens,
                self.monthly_tokens,
                self.daily_spend,
                self.monthly_spend,
            )
        )

    def budgeted(self) -> bool:
        """Whether a budget window (tokens or money) is limited: its counters need seeding."""
        return self.has_period() or any(
            v is not None
            for v in (self.daily_tokens, self.monthly_tokens, self.daily_spend, self.monthly_spend)
        )

    def has_period(self) -> bool:
        """Whether a budget for a fixed period is in force: outside the period the level admits nothing."""
        return self.period_end is not None and (
            self.period_tokens is not None or self.period_spend is not None
        )

    @property
    def period_id(self) -> str:
        """The period's name in counter keys: its start in milliseconds (a new start, a fresh counter)."""
        if not self.has_period():
            return "none"
        return "open" if self.period_start is None else str(round(self.period_start * 1000))


#: Limits are counted per level: the request's key, its user and its team each have their own counters.
Limits = KeyLimits

#: Money is counted in millionths of the currency unit (integers: exact sums in Lua and Python alike).
MICROS = 1_000_000


def to_micros(amount: float | None) -> int | None:
    """An amount of money as whole millionths (rounded up: a budget never grows by rounding)."""
    return None if amount is None else max(0, math.ceil(amount * MICROS - 1e-6))


@dataclass(frozen=True, slots=True)
class Level:
    """One level a request counts against: its key, its user or its team, with that level's limits.

    `name` is what a refusal shows (a key's or a team's name, a user's email); never a secret."""

    kind: LevelKind
    id: str
    limits: KeyLimits
    name: str | None = None

    @property
    def counter(self) -> str:
        """The counter's name in the store; a key's is its bare id (the counters keys had before levels)."""
        return self.id if self.kind == "key" else f"{self.kind}:{self.id}"


def format_duration(seconds: float) -> str:
    """Format a duration like OpenAI's x-ratelimit-reset-* headers (Go style): "20ms", "1s", "8.64s", "6m0s".

    Rounded up to whole milliseconds so that a client never comes back early.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    sec_text = f"{secs}.{frac:03d}".rstrip("0").rstrip(".") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """The request and token limits as OpenAI reports them in the x-ratelimit-* response headers.

    reset_*_s is the time until the limit is back to its initial (full) state, as OpenAI defines it.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers; a header whose value is unknown (None) is left out."""
        out: dict[str, str] = {}
        for name, limit, remaining, reset in (
            ("requests", self.limit_requests, self.remaining_requests, self.reset_requests_s),
            ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens_s),
        ):
            if limit is not None:
                out[f"x-ratelimit-limit-{name}"] = str(limit)
            if remaining is not None:
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, remaining))
            if reset is not None:
                out[f"x-ratelimit-reset-{name}"] = format_duration(reset)
        return out


EMPTY_STATE = RateLimitState()

_DESCRIPTIONS: dict[str, str] = {
    "requests": "requests per minute (RPM)",
    "tokens": "tokens per minute (TPM)",
    "daily_budget": "daily token budget",
    "monthly_budget": "monthly token budget",
    "daily_spend": "daily spend budget",
    "monthly_spend": "monthly spend budget",
    "period_budget": "period token budget",
    "period_spend": "period spend budget",
}
_BUDGETS = (
    "daily_budget",
    "monthly_budget",
    "daily_spend",
    "monthly_spend",
    "period_budget",
    "period_spend",
    "period_not_started",
    "period_ended",
)
#: Refusals that waiting does not cure: no Retry-After.
_FINAL = ("period_budget", "period_spend", "period_ended")
_LEVEL_NAMES = {"key": "API key", "user": "user", "team": "team"}


def iso_time(ts: float | None) -> str:
    """A UTC timestamp as ISO 8601 (seconds, `Z`), as refusals and listings show period bounds."""
    if ts is None:
        return "the beginning"
    when = datetime.fromtimestamp(ts, tz=UTC)
    return when.isoformat(timespec="seconds" if when.microsecond == 0 else "milliseconds").replace(
        "+00:00", "Z"
    )


def money(micros: float) -> str:
    """An amount of millionths as currency units, with as many decimals as it needs (at most six)."""
    text = f"{micros / MICROS:.6f}".rstrip("0")
    return text + "00" if text.endswith(".") else text


class LimitExceeded(Exception):
    """A request would exceed one of its key's limits; nothing was taken."""

    def __init__(
        self,
        kind: LimitKind,
        retry_after: float,
        state: RateLimitState,
        *,
        limit: int,
        used: float,
        requested: int,
        level: Level | None = None,
    ) -> None:
        self.kind: LimitKind = kind
        self.retry_after = max(0.0, retry_after)
        self.state = state
        self.limit = limit  # a spend budget's figures are millionths of the currency unit
        self.used = used
        self.requested = requested
        self.level = level  # the level that refused (None: a key, as before levels)
        super().__init__(self.message)

    @property
    def level_kind(self) -> LevelKind:
        return self.level.kind if self.level is not None else "key"

    @property
    def budget(self) -> bool:
        return self.kind in _BUDGETS

    @property
    def retryable(self) -> bool:
        """Whether waiting helps (a Retry-After is worth sending): not for a spent or ended period."""
        return self.kind not in _FINAL

    @property
    def code(self) -> str:
        """The error code: a key's spent budget is OpenAI's insufficient_quota, a user's or a team's
        user_budget_exceeded / team_budget_exceeded; every rate or parallel limit rate_limit_exceeded."""
        if not self.budget:
            return "rate_limit_exceeded"
        kind = self.level_kind
        return "insufficient_quota" if kind == "key" else f"{kind}_budget_exceeded"

    @property
    def message(self) -> str:
        """Human text naming the limit and, for a user or a team, the level (never a key's secret)."""
        text = self._message()
        level = self.level
        if level is None or level.kind == "key":
            return text
        who = f" '{level.name}'" if level.name else ""
        return f"Your {_LEVEL_NAMES[level.kind]}{who} refused the request. {text}"

    def _period_message(self) -> str | None:
        limits = self.level.limits if self.level is not None else KeyLimits()
        whose = f"The {_LEVEL_NAMES[self.level_kind]}'s budget period"
        end = iso_time(limits.period_end)
        if self.kind == "period_not_started":
            return (
                f"{whose} starts at {iso_time(limits.period_start)} (in {format_duration(self.retry_after)}) "
                f"and ends at {end}: no requests are admitted before it starts."
            )
        if self.kind == "period_ended":
            return (
                f"{whose} ended at {end}: no requests are admitted until an administrator sets a new "
                "budget period."
            )
        if self.kind == "period_spend":
            figures = f"limit {money(self.limit)}, used {money(self.used)}, requested {money(self.requested)}"
        elif self.kind == "period_budget":
            used = math.ceil(self.used - EPSILON)
            figures = f"limit {self.limit}, used {used}, requested {self.requested}"
        else:
            return None
        hint = " (used includes requests in flight; a request reserves its estimate up front: a lower "
        hint += "max_tokens reserves less)"
        return (
            f"You exceeded your {_DESCRIPTIONS[self.kind]}: {figures}{hint}. The period budget does not "
            f"renew: it runs from {iso_time(limits.period_start)} until the period ends at {end}."
        )

    def _message(self) -> str:
        period = self._period_message()
        if period is not None:
            return period
        wait = format_duration(self.retry_after)
        if self.kind in ("daily_spend", "monthly_spend"):
            period = "UTC day" if self.kind == "daily_spend" else "UTC month"
            return (
                f"You exceeded your {_DESCRIPTIONS[self.kind]}: limit {money(self.limit)}, used "
                f"{money(self.used)}, requested {money(self.requested)} (used includes requests in flight; "
                "a request reserves its estimated cost up front: a lower max_tokens reserves less). "
                f"The budget resets at the start of the next {period}, in {wait}."
            )
        if self.kind == "parallel":
            return (
                f"Too many parallel requests: limit {self.limit} in flight. "
                f"Please try again when one of them has finished (retry in about {wait})."
            )
        used = math.ceil(self.used - EPSILON)
        what = _DESCRIPTIONS[self.kind]
        text = f"limit {self.limit}, used {used}, requested {self.requested}"
        if self.kind in ("daily_budget", "monthly_budget"):
            period = "UTC day" if self.kind == "daily_budget" else "UTC month"
            hint = ""
            if self.requested > self.limit - used:
                hint = " Tokens are reserved up front (prompt estimate + max_tokens): try a lower max_tokens."
            return (
                f"You exceeded your {what}: {text} (used includes requests in flight).{hint} "
                f"The budget resets at the start of the next {period}, in {wait}."
            )
        return f"Rate limit reached on {what}: {text}. Please try again in {wait}."


class LimiterUnavailable(Exception):
    """The limiter's store is unreachable and the limiter is configured to fail closed (API: 503)."""


class SeedNeeded(Exception):
    """acquire() found no counter for a budget window of the key (a restarted or flushed store, a fresh
    worker, a new day): nothing was taken. Load the key's usage of that day and month from the request log,
    hand it to seed(), then acquire again."""

    def __init__(self, key_id: str, day: int, month: int, level: Level | None = None) -> None:
        what = f"{level.kind} {level.id}" if level is not None else f"key {key_id}"
        super().__init__(f"budget counters of {what} need seeding for day {day}, month {month}")
        self.key_id = key_id
        self.day = day
        self.month = month
        self.level = level if level is not None else Level("key", key_id, KeyLimits())


@dataclass(slots=True, weakref_slot=True)
class Reservation:
    """What acquire() took for one request; hand it to settle() exactly once when the request ends."""

    key_id: str
    tokens: int
    state: RateLimitState
    limits: KeyLimits = field(default_factory=KeyLimits)
    levels: tuple[Level, ...] = ()  # every level the reservation was taken on (the first is key_id's)
    cost: int = 0  # millionths of the currency unit reserved against spend budgets
    id: str = ""
    acquired_at: float = 0.0  # the limiter's clock (Redis TIME for Redis) when the tokens were reserved
    day: int = 0  # UTC day number (days since the epoch) the budget reservation was booked on
    month: int = 0  # UTC month number (year * 12 + month - 1) the budget reservation was booked on
    parallel_slot: bool = False  # counted against max_parallel (every live reservation holds a lease)
    degraded: bool = False  # the limiter's store was unreachable and the request went through unchecked
    settled: bool = False

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers for the response."""
        return self.state.headers()


class Limiter(abc.ABC):
    """Per-key request/token rate limits, parallel slots and token budgets.

    acquire() before the upstream call reserves the estimated tokens; settle() afterwards replaces the
    reservation with the real usage. Reserving before and settling after is what keeps concurrent requests
    from overshooting a budget.

    Windows (the same in both implementations):
    - RPM and TPM are leaky buckets (GCRA-like) of capacity rpm/tpm that drain continuously at limit/window_s
      (window_s = 60 s by default): a full burst of `limit` is allowed, then the rate is limit per minute.
      This is OpenAI's own semantics: x-ratelimit-reset-* is the time until the bucket is empty again
      ("resets to its initial state"), retry_after the time until the refused request would fit. O(1) state.
    - Daily and monthly budgets are fixed UTC windows (calendar day, calendar month). A reservation made on
      one day is settled on that day even if the request ends after midnight.
    - Admission is strict: a request is refused if its reservation does not fit what is left. A reservation
      larger than the whole limit fits only an empty bucket/budget, so such a request can still run once;
      usage can then exceed a limit by at most that one reservation (or by usage above the reservation).
    - Every admitted request holds an in-flight lease (lease_s, default 30 s) that counts against
      max_parallel. The limiter renews the leases of its unsettled reservations in the background, so long
      streams keep theirs; settle() releases it. A settle that cannot reach the store is retried until it
      lands, and settling is idempotent (the lease is the proof that it has not been applied yet); if it
      never lands (the worker died) the lease simply expires.
    - With seed_budgets, a budget window whose counter is missing (a restarted store, a fresh worker, a new
      day) admits nothing until seed() has put the request log's usage of that window in (SeedNeeded).
    - Token usage per UTC day/month is counted even without a budget (for usage() and for a budget set later).
    - A period budget (period_tokens/period_spend for [period_start, period_end)) counts what the level
      admits within the period on a counter named by the period's start (a new start: a fresh counter).
      Before its start and from its end on, a level with a period budget admits nothing
      (period_not_started, with the wait until the start; period_ended). A spent period budget does not
      renew: period_budget/period_spend refusals are final (LimitExceeded.retryable is False).
    - A limit of 0 refuses every request; None is unlimited.
    """

    async def acquire(self, key_id: str, limits: KeyLimits, reserve_tokens: int) -> Reservation:
        """Atomically count the request, take a parallel slot and reserve tokens on one key; LimitExceeded
        if any limit would be exceeded (then nothing is taken)."""
        return await self.acquire_levels((Level("key", key_id, limits),), reserve_tokens)

    @abc.abstractmethod
    async def acquire_levels(
        self, levels: Sequence[Level], reserve_tokens: int, reserve_cost: int = 0
    ) -> Reservation:
        """Atomically, on every level at once: count the request, take a parallel slot, reserve tokens and
        `reserve_cost` (millionths) against spend budgets. LimitExceeded names the level and the limit
        that refused (of several, the one with the longest wait); then nothing is taken on any level."""

    @abc.abstractmethod
    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_cost: int | None = None
    ) -> None:
        """Release the parallel slots and replace the reservation by the actual usage on every level
        (`actual_cost` in millionths; None keeps the reserved cost). A second call does nothing."""

    async def usage(self, key_id: str, limits: KeyLimits) -> dict[str, Any]:
        """Current counters of one key, for admin/status pages."""
        return await self.usage_level(Level("key", key_id, limits))

    @abc.abstractmethod
    async def usage_level(self, level: Level) -> dict[str, Any]:
        """Current counters of one level (a key, a user, a team)."""

    async def seed(self, key_id: str, day: int, day_tokens: int, month: int, month_tokens: int) -> None:
        """Put a key's budget window usage from the request log in (see seed_level)."""
        await self.seed_level(Level("key", key_id, KeyLimits()), day, day_tokens, month, month_tokens)

    async def seed_level(  # noqa: B027
        self,
        level: Level,
        day: int,
        day_tokens: int,
        month: int,
        month_tokens: int,
        day_cost: int = 0,
        month_cost: int = 0,
        period_tokens: int = 0,
        period_cost: int = 0,
    ) -> None:
        """Put a level's budget window usage (tokens, and cost in millionths) from the request log in,
        after SeedNeeded; period_* is its usage within its budget period (level.limits), if it has one.
        A counter keeps the larger of what it has and what it is given (see the implementations); a seed
        for a day (month) that is no longer the current one is ignored."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# --- shared arithmetic of both implementations (the Redis Lua scripts mirror it) ---------------------------


def utc_day(now: float) -> int:
    """Days since the epoch of a UTC timestamp."""
    return int(now // 86400)


def utc_month(now: float) -> int:
    """Months since year 0 of a UTC timestamp: year * 12 + month - 1."""
    d = datetime.fromtimestamp(utc_day(now) * 86400, tz=UTC)
    return d.year * 12 + d.month - 1


def month_start(month: int) -> float:
    """The UTC timestamp at which month number `month` (year * 12 + month - 1) begins."""
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC).timestamp()


def seconds_to_next_day(now: float) -> float:
    """Seconds until the next UTC midnight."""
    return (utc_day(now) + 1) * 86400 - now


def seconds_to_next_month(now: float) -> float:
    """Seconds until 00:00 UTC on the first day of the next month."""
    return month_start(utc_month(now) + 1) - now


def rate_state(
    limits: KeyLimits, requests_level: float, tokens_level: float, window_s: float
) -> RateLimitState:
    """Header state from the levels of the request and token buckets."""
    lr = rr = lt = rt = None
    sr = st = None
    if limits.rpm is not None:
        lr = limits.rpm
        rr = max(0, math.floor(limits.rpm - requests_level + EPSILON))
        sr = requests_level * window_s / limits.rpm if limits.rpm > 0 else 0.0
    if limits.tpm is not None:
        lt = limits.tpm
        rt = max(0, math.floor(limits.tpm - tokens_level + EPSILON))
        st = tokens_level * window_s / limits.tpm if limits.tpm > 0 else 0.0
    return RateLimitState(lr, rr, sr, lt, rt, st)


def usage_report(
    limits: KeyLimits,
    *,
    requests_level: float,
    tokens_level: float,
    in_flight: int,
    day_used: int,
    month_used: int,
    now: float,
    window_s: float,
    day_cost: int = 0,
    month_cost: int = 0,
    period_used: int = 0,
    period_cost: int = 0,
) -> dict[str, Any]:
    """The usage() dictionary both implementations return."""
    state = rate_state(limits, requests_level, tokens_level, window_s)

    def budget(limit: int | None, used: int, reset: float | None) -> dict[str, Any]:
        remaining = None if limit is None else max(0, limit - used)
        return {"limit": limit, "used": used, "remaining": remaining, "reset_s": reset}

    def spend(limit: float | None, used: int, reset: float | None) -> dict[str, Any]:
        remaining = None if limit is None else max(0.0, limit - used / MICROS)
        return {"limit": limit, "used": used / MICROS, "remaining": remaining, "reset_s": reset}

    return {
        "requests": {
            "limit": limits.rpm,
            "used": math.ceil(requests_level - EPSILON) if limits.rpm is not None else None,
            "remaining": state.remaining_requests,
            "reset_s": state.reset_requests_s,
        },
        "tokens": {
            "limit": limits.tpm,
            "used": math.ceil(tokens_level - EPSILON) if limits.tpm is not None else None,
            "remaining": state.remaining_tokens,
            "reset_s": state.reset_tokens_s,
        },
        "parallel": {"limit": limits.max_parallel, "in_flight": in_flight},
        "daily_tokens": budget(limits.daily_tokens, day_used, seconds_to_next_day(now)),
        "monthly_tokens": budget(limits.monthly_tokens, month_used, seconds_to_next_month(now)),
        "daily_spend": spend(limits.daily_spend, day_cost, seconds_to_next_day(now)),
        "monthly_spend": spend(limits.monthly_spend, month_cost, seconds_to_next_month(now)),
        "period": {
            "start": iso_time(limits.period_start) if limits.period_start is not None else None,
            "end": iso_time(limits.period_end) if limits.period_end is not None else None,
            "tokens": budget(limits.period_tokens, period_used, period_remaining(limits, now)),
            "spend": spend(limits.period_spend, period_cost, period_remaining(limits, now)),
        },
    }


def period_check(limits: KeyLimits, now: float) -> tuple[LimitKind, float] | None:
    """A period-budget level outside its period: ("period_not_started", seconds to its start) or
    ("period_ended", NEVER_S); None inside it or without a period budget."""
    if not limits.has_period():
        return None
    assert limits.period_end is not None
    if limits.period_start is not None and now < limits.period_start:
        return "period_not_started", limits.period_start - now
    if now >= limits.period_end:
        return "period_ended", NEVER_S
    return None


def period_remaining(limits: KeyLimits, now: float) -> float | None:
    """Seconds until the period ends (None without an end)."""
    return None if limits.period_end is None else max(0.0, limits.period_end - now)


def tightest(states: Sequence[RateLimitState]) -> RateLimitState:
    """The x-ratelimit-* state of several levels: for requests and for tokens, the level with the least
    remaining (ties: the one that takes longer to reset)."""
    if len(states) == 1:
        return states[0]
    req = [s for s in states if s.limit_requests is not None]
    tok = [s for s in states if s.limit_tokens is not None]
    r = min(req, key=lambda s: (s.remaining_requests or 0, -(s.reset_requests_s or 0.0))) if req else None
    t = min(tok, key=lambda s: (s.remaining_tokens or 0, -(s.reset_tokens_s or 0.0))) if tok else None
    return RateLimitState(
        r.limit_requests if r else None,
        r.remaining_requests if r else None,
        r.reset_requests_s if r else None,
        t.limit_tokens if t else None,
        t.remaining_tokens if t else None,
        t.reset_tokens_s if t else None,
    )
