"""In-process limiter: exact within one event loop (one worker); RedisLimiter is its twin across workers."""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import (
    DEFAULT_LEASE_S,
    DEFAULT_RATE_WINDOW_S,
    EPSILON,
    PARALLEL_RETRY_AFTER_S,
    KeyLimits,
    Limiter,
    LimitExceeded,
    LimitKind,
    Reservation,
    SeedNeeded,
    rate_state,
    seconds_to_next_day,
    seconds_to_next_month,
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
    seeded_day: int = -1  # the day (month) whose budget counter has been seeded from the request log
    seeded_month: int = -1


def _drain(level: float, ts: float, limit: int | None, now: float, window_s: float) -> float:
    if limit is None or limit <= 0 or now <= ts:
        return level
    return max(0.0, level - (now - ts) * limit / window_s)


def _roll(st: _KeyState, now: float) -> None:
    """Start a new budget day (month) when `now` is past the one the state counts."""
    day, month = utc_day(now), utc_month(now)
    if st.day != day:
        st.day, st.day_used = day, 0
    if st.month != month:
        st.month, st.month_used = month, 0


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
        if st.in_flight:
            for rid in [rid for rid, expiry in st.in_flight.items() if expiry <= now]:
                if rid in self._live:
                    st.in_flight[rid] = now + self.lease_s  # still running: renewed
                else:
                    del st.in_flight[rid]
        return st

    async def acquire(self, key_id: str, limits: KeyLimits, reserve_tokens: int) -> Reservation:
        reserve = max(0, int(reserve_tokens))
        now = self._clock()
        st = self._refresh(key_id, limits, now)
        w = self.window_s
        if self.seed_budgets and (
            (limits.daily_tokens is not None and st.seeded_day != st.day)
            or (limits.monthly_tokens is not None and st.seeded_month != st.month)
        ):
            raise SeedNeeded(key_id, st.day, st.month)

        # Every limit that would be exceeded; the one with the longest wait is reported.
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
        if limits.daily_tokens is not None and (
            limits.daily_tokens <= 0 or st.day_used + min(reserve, limits.daily_tokens) > limits.daily_tokens
        ):
            consider(seconds_to_next_day(now), "daily_budget", limits.daily_tokens, st.day_used, reserve)
        if limits.monthly_tokens is not None and (
            limits.monthly_tokens <= 0
            or st.month_used + min(reserve, limits.monthly_tokens) > limits.monthly_tokens
        ):
            consider(
                seconds_to_next_month(now), "monthly_budget", limits.monthly_tokens, st.month_used, reserve
            )

        if worst is not None:
            retry, kind, limit, used, requested = worst
            state = rate_state(limits, st.requests_level, st.tokens_level, w)
            raise LimitExceeded(kind, retry, state, limit=limit, used=used, requested=requested)

        rid = secrets.token_hex(8)
        if limits.rpm is not None:
            st.requests_level += 1
        if limits.tpm is not None:
            st.tokens_level += reserve
        st.in_flight[rid] = now + self.lease_s
        st.day_used += reserve
        st.month_used += reserve
        reservation = Reservation(
            key_id=key_id,
            tokens=reserve,
            state=rate_state(limits, st.requests_level, st.tokens_level, w),
            limits=limits,
            id=rid,
            acquired_at=now,
            day=st.day,
            month=st.month,
            parallel_slot=limits.max_parallel is not None,
        )
        self._live[rid] = reservation
        return reservation

    async def seed(self, key_id: str, day: int, day_tokens: int, month: int, month_tokens: int) -> None:
        now = self._clock()
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState(requests_ts=now, tokens_ts=now)
        _roll(st, now)
        if st.day == day and st.seeded_day != day:
            st.day_used = max(st.day_used, int(day_tokens))
            st.seeded_day = day
        if st.month == month and st.seeded_month != month:
            st.month_used = max(st.month_used, int(month_tokens))
            st.seeded_month = month

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        if reservation.settled or reservation.degraded:
            reservation.settled = True
            return
        reservation.settled = True
        st = self._keys.get(reservation.key_id)
        if st is None:
            return
        self._live.pop(reservation.id, None)
        st.in_flight.pop(reservation.id, None)
        delta = max(0, int(actual_tokens)) - reservation.tokens
        if delta == 0:
            return
        now = self._clock()
        tpm = reservation.limits.tpm
        if tpm is not None and tpm > 0:
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
        if st.month == reservation.month:
            st.month_used = max(0, st.month_used + delta)

    async def usage(self, key_id: str, limits: KeyLimits) -> dict[str, Any]:
        now = self._clock()
        st = self._refresh(key_id, limits, now)
        return usage_report(
            limits,
            requests_level=st.requests_level,
            tokens_level=st.tokens_level,
            in_flight=len(st.in_flight),
            day_used=st.day_used,
            month_used=st.month_used,
            now=now,
            window_s=self.window_s,
        )
