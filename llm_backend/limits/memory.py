"""In-process limiter: exact within one event loop (one worker); RedisLimiter is its twin across workers."""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import (
    DEFAULT_LEASE_S,
    DEFAULT_RATE_WINDOW_S,
    EPSILON,
    NEVER_S,
    PARALLEL_RETRY_AFTER_S,
    KeyLimits,
    Level,
    Limiter,
    LimitExceeded,
    LimitKind,
    Reservation,
    SeedNeeded,
    period_check,
    rate_state,
    seconds_to_next_day,
    seconds_to_next_month,
    tightest,
    to_micros,
    usage_report,
    utc_day,
    utc_month,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _KeyState:
    requests_level: float = 0.0  # leaky bucket of requests: drains at rpm / window per second
    requests_ts: float = 0.0
    tokens_level: float = 0.0  # leaky bucket of tokens: drains at tpm / window per second
    tokens_ts: float = 0.0
    in_flight: dict[str, float] = field(default_factory=dict)  # reservation id -> lease expiry
    day: int = -1
    day_used: int = 0
    month: int = -1
    month_used: int = 0
    day_cost: int = 0  # millionths of the currency unit, like month_cost
    month_cost: int = 0
    seeded_day: int = -1  # the day (month) whose budget counter has been seeded from the request log
    seeded_month: int = -1
    period: str | None = None  # the budget period (KeyLimits.period_id) the period counters count
    period_used: int = 0
    period_cost: int = 0
    seeded_period: str | None = None


def _drain(level: float, ts: float, limit: int | None, now: float, window_s: float) -> float:
    if limit is None or limit <= 0 or now <= ts:
        return level
    return max(0.0, level - (now - ts) * limit / window_s)


def _roll(st: _KeyState, now: float) -> None:
    """Start a new budget day (month) when `now` is past the one the state counts."""
    day, month = utc_day(now), utc_month(now)
    if st.day != day:
        st.day, st.day_used, st.day_cost = day, 0, 0
    if st.month != month:
        st.month, st.month_used, st.month_cost = month, 0, 0


def _never(now: float) -> float:  # the shape of seconds_to_next_day: a budget that does not renew
    return NEVER_S


def _roll_period(st: _KeyState, limits: KeyLimits) -> bool:
    """Point the period counters at the level's budget period (a new period starts at zero); False when
    the level has no period budget."""
    if not limits.has_period():
        return False
    if st.period != limits.period_id:
        st.period, st.period_used, st.period_cost, st.seeded_period = limits.period_id, 0, 0, None
    return True


class InMemoryLimiter(Limiter):
    """Limits kept in this process's memory.

    Every check-and-update happens without an await in between, so it is atomic within one event loop.
    Several gunicorn workers each keep their own counters: use RedisLimiter there.

    A lease here is renewed for as long as its Reservation object lives unsettled (a weak reference: no
    background task); a reservation dropped without settle() frees its slot when its lease runs out.
    """

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_RATE_WINDOW_S,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
        seed_budgets: bool = False,
    ) -> None:
        self.window_s = window_s
        self.lease_s = lease_s
        self.seed_budgets = seed_budgets
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._live: weakref.WeakValueDictionary[str, Reservation] = weakref.WeakValueDictionary()

    def _refresh(self, key_id: str, limits: KeyLimits, now: float) -> _KeyState:
        """Drain the buckets, roll the budget windows over and drop expired leases, as of now."""
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState(requests_ts=now, tokens_ts=now)
        st.requests_level = _drain(st.requests_level, st.requests_ts, limits.rpm, now, self.window_s)
        st.requests_ts = max(st.requests_ts, now)
        st.tokens_level = _drain(st.tokens_level, st.tokens_ts, limits.tpm, now, self.window_s)
        st.tokens_ts = max(st.tokens_ts, now)
        _roll(st, now)
        _roll_period(st, limits)
        if st.in_flight:
            for rid in [rid for rid, expiry in st.in_flight.items() if expiry <= now]:
                if rid in self._live:
                    st.in_flight[rid] = now + self.lease_s  # still running: renewed
                else:
                    del st.in_flight[rid]
        return st

    def _check(
        self, level: Level, st: _KeyState, reserve: int, cost: int, now: float
    ) -> tuple[float, LimitKind, int, float, int] | None:
        """The limit of one level the request would exceed with the longest wait, or None."""
        limits = level.limits
        w = self.window_s
        worst: tuple[float, LimitKind, int, float, int] | None = None

        def consider(retry: float, kind: LimitKind, limit: int, used: float, requested: int) -> None:
            nonlocal worst
            if worst is None or retry > worst[0]:
                worst = (retry, kind, limit, used, requested)

        if limits.rpm is not None:
            if limits.rpm <= 0:
                consider(w, "requests", limits.rpm, st.requests_level, 1)
            elif st.requests_level + 1 > limits.rpm + EPSILON:
                retry = (st.requests_level + 1 - limits.rpm) * w / limits.rpm
                consider(retry, "requests", limits.rpm, st.requests_level, 1)
        if limits.tpm is not None:
            # A reservation larger than the whole limit is admitted only into an empty bucket.
            need = min(reserve, limits.tpm)
            if limits.tpm <= 0:
                consider(w, "tokens", limits.tpm, st.tokens_level, reserve)
            elif st.tokens_level + need > limits.tpm + EPSILON:
                retry = (st.tokens_level + need - limits.tpm) * w / limits.tpm
                consider(retry, "tokens", limits.tpm, st.tokens_level, reserve)
        if limits.max_parallel is not None and len(st.in_flight) >= limits.max_parallel:
            consider(PARALLEL_RETRY_AFTER_S, "parallel", limits.max_parallel, len(st.in_flight), 1)
        budgets: list[tuple[str, int | None, int, int, Callable[[float], float]]] = [
            ("daily_budget", limits.daily_tokens, st.day_used, reserve, seconds_to_next_day),
            ("monthly_budget", limits.monthly_tokens, st.month_used, reserve, seconds_to_next_month),
            ("daily_spend", to_micros(limits.daily_spend), st.day_cost, cost, seconds_to_next_day),
            ("monthly_spend", to_micros(limits.monthly_spend), st.month_cost, cost, seconds_to_next_month),
        ]
        if limits.has_period():
            outside = period_check(limits, now)
            if outside is not None:
                consider(outside[1], outside[0], 0, 0, reserve)
            else:  # inside the period: its budgets do not renew
                budgets.append(("period_budget", limits.period_tokens, st.period_used, reserve, _never))
                budgets.append(("period_spend", to_micros(limits.period_spend), st.period_cost, cost, _never))
        for kind, limit, used, amount, reset in budgets:
            if limit is not None and (limit <= 0 or used + min(amount, limit) > limit):
                consider(reset(now), kind, limit, used, amount)  # type: ignore[arg-type]
        return worst

    async def acquire_levels(
        self, levels: Sequence[Level], reserve_tokens: int, reserve_cost: int = 0
    ) -> Reservation:
        reserve = max(0, int(reserve_tokens))
        cost = max(0, int(reserve_cost))
        now = self._clock()
        w = self.window_s
        states = [self._refresh(level.counter, level.limits, now) for level in levels]
        if self.seed_budgets:
            for level, st in zip(levels, states, strict=True):
                limits = level.limits
                days = limits.daily_tokens is not None or limits.daily_spend is not None
                months = limits.monthly_tokens is not None or limits.monthly_spend is not None
                period = limits.has_period() and period_check(limits, now) is None
                if (
                    (days and st.seeded_day != st.day)
                    or (months and st.seeded_month != st.month)
                    or (period and st.seeded_period != st.period)
                ):
                    raise SeedNeeded(level.counter, st.day, st.month, level)

        # Every limit of every level that would be exceeded; the one with the longest wait is reported.
        worst: tuple[float, LimitKind, int, float, int] | None = None
        refused: int | None = None
        for i, (level, st) in enumerate(zip(levels, states, strict=True)):
            found = self._check(level, st, reserve, cost, now)
            if found is not None and (worst is None or found[0] > worst[0]):
                worst, refused = found, i
        if worst is not None:
            assert refused is not None
            retry, kind, limit, used, requested = worst
            st = states[refused]
            level = levels[refused]
            state = rate_state(level.limits, st.requests_level, st.tokens_level, w)
            raise LimitExceeded(kind, retry, state, limit=limit, used=used, requested=requested, level=level)

        rid = secrets.token_hex(8)
        for level, st in zip(levels, states, strict=True):
            if level.limits.rpm is not None:
                st.requests_level += 1
            if level.limits.tpm is not None:
                st.tokens_level += reserve
            st.in_flight[rid] = now + self.lease_s
            st.day_used += reserve
            st.month_used += reserve
            st.day_cost += cost
            st.month_cost += cost
            if level.limits.has_period():  # admitted: inside the period
                st.period_used += reserve
                st.period_cost += cost
        first = states[0]
        reservation = Reservation(
            key_id=levels[0].counter,
            tokens=reserve,
            state=tightest(
                [
                    rate_state(lv.limits, st.requests_level, st.tokens_level, w)
                    for lv, st in zip(levels, states, strict=True)
                ]
            ),
            limits=levels[0].limits,
            levels=tuple(levels),
            cost=cost,
            id=rid,
            acquired_at=now,
            day=first.day,
            month=first.month,
            parallel_slot=any(lv.limits.max_parallel is not None for lv in levels),
        )
        self._live[rid] = reservation
        return reservation

    async def seed_level(
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
        now = self._clock()
        st = self._keys.get(level.counter)
        if st is None:
            st = self._keys[level.counter] = _KeyState(requests_ts=now, tokens_ts=now)
        _roll(st, now)
        if st.day == day and st.seeded_day != day:
            st.day_used = max(st.day_used, int(day_tokens))
            st.day_cost = max(st.day_cost, int(day_cost))
            st.seeded_day = day
        if st.month == month and st.seeded_month != month:
            st.month_used = max(st.month_used, int(month_tokens))
            st.month_cost = max(st.month_cost, int(month_cost))
            st.seeded_month = month
        if _roll_period(st, level.limits) and st.seeded_period != st.period:
            st.period_used = max(st.period_used, int(period_tokens))
            st.period_cost = max(st.period_cost, int(period_cost))
            st.seeded_period = st.period

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_cost: int | None = None
    ) -> None:
        if reservation.settled or reservation.degraded:
            reservation.settled = True
            return
        reservation.settled = True
        self._live.pop(reservation.id, None)
        levels = reservation.levels or (Level("key", reservation.key_id, reservation.limits),)
        delta = max(0, int(actual_tokens)) - reservation.tokens
        cost_delta = 0 if actual_cost is None else max(0, int(actual_cost)) - reservation.cost
        now = self._clock()
        for level in levels:
            st = self._keys.get(level.counter)
            if st is None:
                continue
            st.in_flight.pop(reservation.id, None)
            tpm = level.limits.tpm
            if delta != 0 and tpm is not None and tpm > 0:
                st.tokens_level = _drain(st.tokens_level, st.tokens_ts, tpm, now, self.window_s)
                st.tokens_ts = max(st.tokens_ts, now)
                if delta > 0:
                    st.tokens_level += delta
                else:
                    # Refund only what of the reservation has not leaked out of the bucket yet.
                    leaked = max(0.0, now - reservation.acquired_at) * tpm / self.window_s
                    refund = min(-delta, max(0.0, reservation.tokens - leaked))
                    st.tokens_level = max(0.0, st.tokens_level - refund)
            # A reservation booked on a day (month) that is over stays on that day (month).
            if st.day == reservation.day:
                st.day_used = max(0, st.day_used + delta)
                st.day_cost = max(0, st.day_cost + cost_delta)
            if st.month == reservation.month:
                st.month_used = max(0, st.month_used + delta)
                st.month_cost = max(0, st.month_cost + cost_delta)
            # booked on the level's period when it had one (it was admitted inside it)
            if level.limits.has_period() and st.period == level.limits.period_id:
                st.period_used = max(0, st.period_used + delta)
                st.period_cost = max(0, st.period_cost + cost_delta)

    async def usage_level(self, level: Level) -> dict[str, Any]:
        now = self._clock()
        limits = level.limits
        st = self._refresh(level.counter, limits, now)
        return usage_report(
            limits,
            requests_level=st.requests_level,
            tokens_level=st.tokens_level,
            in_flight=len(st.in_flight),
            day_used=st.day_used,
            month_used=st.month_used,
            now=now,
            window_s=self.window_s,
            day_cost=st.day_cost,
            month_cost=st.month_cost,
            period_used=st.period_used if limits.has_period() else 0,
            period_cost=st.period_cost if limits.has_period() else 0,
        )
