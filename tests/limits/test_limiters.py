"""Behaviour shared by both limiters: exact RPM under concurrency, TPM/budget reservations, slots, windows."""

from __future__ import annotations

import asyncio
import random

import pytest

from llm_backend.limits import KeyLimits, LimitExceeded, Reservation
from llm_backend.limits.base import seconds_to_next_day, seconds_to_next_month

from .conftest import Harness


async def _try(h: Harness, key_id: str, limits: KeyLimits, tokens: int) -> Reservation | LimitExceeded:
    try:
        return await h.limiter.acquire(key_id, limits, tokens)
    except LimitExceeded as exc:
        return exc


async def test_rpm_exact_under_200_concurrent_requests(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(rpm=10)
    results = await asyncio.gather(*(_try(harness, key_id, limits, 50) for _ in range(200)))

    ok = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, LimitExceeded)]
    assert len(ok) == 10
    assert len(refused) == 190
    assert {e.kind for e in refused} == {"requests"}
    assert all(e.retry_after > 0 for e in refused)
    assert {e.code for e in refused} == {"rate_limit_exceeded"}
    assert sorted(r.state.remaining_requests for r in ok) == list(range(10))  # type: ignore[type-var]
    assert all(e.state.remaining_requests == 0 for e in refused)
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["requests"]["used"] == 10
    assert usage["requests"]["remaining"] == 0


async def test_refused_request_takes_nothing(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(rpm=10, tpm=100, daily_tokens=10_000)
    await harness.limiter.acquire(key_id, limits, 60)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 60)
    assert info.value.kind == "tokens"
    assert info.value.limit == 100
    assert info.value.requested == 60

    usage = await harness.limiter.usage(key_id, limits)
    assert usage["requests"]["used"] == 1  # the refused request was not counted
    assert usage["daily_tokens"]["used"] == 60
    assert 59 <= usage["tokens"]["used"] <= 60  # Redis time runs on while the test does


async def test_tpm_reservation_and_settle_refund(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(tpm=1000)
    first = await harness.limiter.acquire(key_id, limits, 600)
    assert first.state.limit_tokens == 1000
    assert 400 <= (first.state.remaining_tokens or 0) <= 402

    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 500)
    assert info.value.kind == "tokens"
    assert info.value.retry_after == pytest.approx(6.0, abs=0.2)  # 100 tokens over at 1000 per 60 s

    await harness.limiter.settle(first, 100)  # 500 of the 600 reserved come back
    second = await harness.limiter.acquire(key_id, limits, 500)
    assert 400 <= (second.state.remaining_tokens or 0) <= 402
    await harness.limiter.settle(second, 500)
    usage = await harness.limiter.usage(key_id, limits)
    assert 598 <= usage["tokens"]["used"] <= 600
    assert usage["daily_tokens"]["used"] == 600
    assert usage["monthly_tokens"]["used"] == 600


async def test_settle_charges_usage_above_the_reservation(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(tpm=1000, daily_tokens=5000)
    r = await harness.limiter.acquire(key_id, limits, 100)
    await harness.limiter.settle(r, 350)
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["daily_tokens"]["used"] == 350
    assert usage["daily_tokens"]["remaining"] == 4650
    assert 348 <= usage["tokens"]["used"] <= 350


async def test_settle_is_idempotent(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(tpm=1000, daily_tokens=1000, max_parallel=1)
    r = await harness.limiter.acquire(key_id, limits, 400)
    await harness.limiter.settle(r, 100)
    await harness.limiter.settle(r, 100)  # must not refund or release twice
    assert r.settled
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["daily_tokens"]["used"] == 100
    assert 98 <= usage["tokens"]["used"] <= 100
    assert usage["parallel"]["in_flight"] == 0


async def test_parallel_slots_released_by_settle(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(max_parallel=2)
    a = await harness.limiter.acquire(key_id, limits, 10)
    b = await harness.limiter.acquire(key_id, limits, 10)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 10)
    assert info.value.kind == "parallel"
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.retry_after > 0
    assert (await harness.limiter.usage(key_id, limits))["parallel"] == {"limit": 2, "in_flight": 2}

    await harness.limiter.settle(a, 10)
    await harness.limiter.settle(a, 10)  # a double settle frees nothing more
    c = await harness.limiter.acquire(key_id, limits, 10)
    with pytest.raises(LimitExceeded):
        await harness.limiter.acquire(key_id, limits, 10)
    await harness.limiter.settle(b, 0)
    await harness.limiter.settle(c, 0)
    assert (await harness.limiter.usage(key_id, limits))["parallel"]["in_flight"] == 0


async def test_parallel_slot_of_a_lost_request_expires_with_its_lease(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(max_parallel=1)
    await harness.limiter.acquire(key_id, limits, 10)  # never settled: the worker "died"
    with pytest.raises(LimitExceeded):
        await harness.limiter.acquire(key_id, limits, 10)
    harness.advance(harness.limiter.lease_s + 1)  # type: ignore[attr-defined]
    await harness.limiter.acquire(key_id, limits, 10)


async def test_daily_budget_never_overshoots_under_concurrent_streams(harness: Harness, key_id: str) -> None:
    budget, reserve = 1000, 100
    limits = KeyLimits(daily_tokens=budget)
    rng = random.Random(4)
    settled: list[int] = []
    refused: list[LimitExceeded] = []

    async def stream() -> None:
        try:
            r = await harness.limiter.acquire(key_id, limits, reserve)
        except LimitExceeded as exc:
            refused.append(exc)
            return
        await asyncio.sleep(rng.uniform(0, 0.02))  # the upstream streams for a while
        actual = rng.randint(1, reserve)
        await harness.limiter.settle(r, actual)
        settled.append(actual)

    await asyncio.gather(*(stream() for _ in range(50)))

    assert len(settled) >= budget // reserve
    assert sum(settled) <= budget + reserve
    assert sum(settled) <= budget  # reservations never exceed the remaining budget when usage ≤ reservation
    assert refused and {e.kind for e in refused} == {"daily_budget"}
    assert {e.code for e in refused} == {"insufficient_quota"}
    assert all(0 < e.retry_after <= 86400 for e in refused)
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["daily_tokens"]["used"] == sum(settled)
    assert usage["monthly_tokens"]["used"] == sum(settled)

    # What was refunded can be used again.
    left = budget - sum(settled)
    if left > 0:
        r = await harness.limiter.acquire(key_id, limits, left)
        await harness.limiter.settle(r, left)
    with pytest.raises(LimitExceeded):
        await harness.limiter.acquire(key_id, limits, 1)


async def test_reservation_larger_than_the_limit_only_fits_an_empty_window(
    harness: Harness, key_id: str
) -> None:
    limits = KeyLimits(tpm=100, daily_tokens=1000)
    big = await harness.limiter.acquire(key_id, limits, 1500)  # fits nothing, but nothing else is in use
    assert big.state.remaining_tokens == 0
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 1)
    assert info.value.kind == "daily_budget"  # the longest wait is reported
    await harness.limiter.settle(big, 20)
    small = await harness.limiter.acquire(key_id, limits, 50)
    await harness.limiter.settle(small, 50)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 1500)  # not into a window that is in use
    assert info.value.kind == "daily_budget"
    assert "lower max_tokens" in info.value.message


async def test_rate_window_resets(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(rpm=2, tpm=1000)
    await harness.limiter.acquire(key_id, limits, 100)
    await harness.limiter.acquire(key_id, limits, 100)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 100)
    assert info.value.kind == "requests"
    assert info.value.retry_after == pytest.approx(30.0, abs=0.2)  # one request drains every 60 / 2 s
    assert info.value.state.reset_requests_s == pytest.approx(60.0, abs=0.2)

    harness.advance(info.value.retry_after + 0.01)
    r = await harness.limiter.acquire(key_id, limits, 100)
    assert r.state.remaining_requests == 0

    harness.advance(60)  # a whole window: back to the initial state
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["requests"] == {"limit": 2, "used": 0, "remaining": 2, "reset_s": 0.0}
    assert usage["tokens"]["remaining"] == 1000
    r = await harness.limiter.acquire(key_id, limits, 100)
    assert r.headers() == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s",
    }


async def test_daily_budget_resets_at_utc_midnight(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(daily_tokens=100)
    r = await harness.limiter.acquire(key_id, limits, 100)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 10)
    assert info.value.kind == "daily_budget"
    assert info.value.retry_after == pytest.approx(seconds_to_next_day(r.acquired_at), abs=1)

    harness.advance(info.value.retry_after + 1)
    today = await harness.limiter.acquire(key_id, limits, 30)
    assert today.day == r.day + 1
    # Yesterday's request settles after midnight: its refund stays on yesterday.
    await harness.limiter.settle(r, 10)
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["daily_tokens"]["used"] == 30


async def test_monthly_budget_resets_on_the_first_of_the_month(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(monthly_tokens=500, daily_tokens=1000)
    r = await harness.limiter.acquire(key_id, limits, 500)
    await harness.limiter.settle(r, 500)
    harness.advance(seconds_to_next_day(r.acquired_at) + 1)  # a new day does not refill the month
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 10)
    assert info.value.kind == "monthly_budget"
    assert info.value.code == "insufficient_quota"
    assert "monthly token budget" in info.value.message

    harness.advance(info.value.retry_after + 1)
    again = await harness.limiter.acquire(key_id, limits, 10)
    assert again.month == r.month + 1
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["monthly_tokens"]["used"] == 10
    assert usage["monthly_tokens"]["reset_s"] == pytest.approx(
        seconds_to_next_month(again.acquired_at), abs=1
    )


async def test_the_longest_wait_is_reported(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(rpm=1, max_parallel=1, daily_tokens=100)
    await harness.limiter.acquire(key_id, limits, 100)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, limits, 10)
    assert info.value.kind == "daily_budget"


async def test_zero_limit_blocks(harness: Harness, key_id: str) -> None:
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, KeyLimits(rpm=0), 1)
    assert info.value.kind == "requests"
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire(key_id, KeyLimits(monthly_tokens=0), 1)
    assert info.value.kind == "monthly_budget"


async def test_no_limits_still_counts_usage(harness: Harness, key_id: str) -> None:
    limits = KeyLimits()
    r = await harness.limiter.acquire(key_id, limits, 70)
    assert r.headers() == {}
    await harness.limiter.settle(r, 40)
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["daily_tokens"] == {
        "limit": None,
        "used": 40,
        "remaining": None,
        "reset_s": pytest.approx(usage["daily_tokens"]["reset_s"]),
    }
    assert usage["requests"]["used"] is None
    assert usage["parallel"] == {"limit": None, "in_flight": 0}


async def test_keys_are_isolated(harness: Harness, key_id: str) -> None:
    limits = KeyLimits(rpm=1)
    await harness.limiter.acquire(key_id, limits, 1)
    await harness.limiter.acquire(key_id + "-other", limits, 1)
    with pytest.raises(LimitExceeded):
        await harness.limiter.acquire(key_id, limits, 1)
