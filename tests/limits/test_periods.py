"""Budgets for a fixed period: inside, before and after it, a new start counting afresh, concurrency,
and re-seeding from the request log; the same behaviour in memory and on Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from llm_backend.limits import KeyLimits, Level, LimitExceeded, SeedNeeded
from llm_backend.limits.base import NEVER_S

from .conftest import START, Harness

HOUR = 3600.0


def at_start(h: Harness) -> None:
    """Put the harness's clock at START (Redis: its TIME shifted to START; seconds of drift do not matter:
    every period bound below is hours away)."""
    if h.name == "redis":
        h.limiter.time_offset_s = START - time.time()  # type: ignore[attr-defined]


def period(
    tokens: int | None = None, spend: float | None = None, start: float = -HOUR, end: float = HOUR
) -> KeyLimits:
    return KeyLimits(
        period_tokens=tokens, period_spend=spend, period_start=START + start, period_end=START + end
    )


async def test_tokens_inside_the_period_count_and_refuse_when_spent(harness: Harness, key_id: str) -> None:
    at_start(harness)
    team = Level("team", key_id, period(tokens=100), name="research")
    r = await harness.limiter.acquire_levels([team], 60)
    await harness.limiter.settle(r, 70)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire_levels([team], 40)
    exc = info.value
    assert exc.kind == "period_budget"
    assert exc.code == "team_budget_exceeded"
    assert (exc.limit, exc.used, exc.requested) == (100, 70, 40)
    assert not exc.retryable and exc.retry_after == NEVER_S
    assert "period budget" in exc.message and "research" in exc.message
    assert "2025-06-15T16:06:40Z" in exc.message  # when the period ends
    r = await harness.limiter.acquire_levels([team], 30)  # what is left still fits
    await harness.limiter.settle(r, 30)
    usage = await harness.limiter.usage_level(team)
    assert usage["period"]["tokens"]["used"] == 100
    assert usage["period"]["end"] == "2025-06-15T16:06:40Z"


async def test_spend_inside_the_period(harness: Harness, key_id: str) -> None:
    at_start(harness)
    key = Level("key", key_id, period(spend=1.0))
    r = await harness.limiter.acquire_levels([key], 10, 600_000)
    await harness.limiter.settle(r, 10, 500_000)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire_levels([key], 10, 600_000)
    assert info.value.kind == "period_spend"
    assert info.value.code == "insufficient_quota"
    assert "period spend budget" in info.value.message and "limit 1.00, used 0.5," in info.value.message
    r = await harness.limiter.acquire_levels([key], 10, 500_000)
    await harness.limiter.settle(r, 10, 400_000)
    assert (await harness.limiter.usage_level(key))["period"]["spend"]["used"] == pytest.approx(0.9)


async def test_before_the_start_nothing_is_admitted_and_the_wait_is_the_start(
    harness: Harness, key_id: str
) -> None:
    at_start(harness)
    user = Level("user", key_id, period(tokens=1000, start=2 * HOUR, end=5 * HOUR), name="ann@example.com")
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire_levels([user], 1)
    exc = info.value
    assert exc.kind == "period_not_started" and exc.code == "user_budget_exceeded" and exc.retryable
    assert 1.9 * HOUR < exc.retry_after <= 2 * HOUR
    assert "The user's budget period starts at 2025-06-15T17:06:40Z" in exc.message
    harness.advance(2 * HOUR + 1)
    r = await harness.limiter.acquire_levels([user], 1)
    await harness.limiter.settle(r, 1)


async def test_after_the_end_nothing_is_admitted_and_there_is_no_wait(harness: Harness, key_id: str) -> None:
    at_start(harness)
    team = Level("team", key_id, period(tokens=1000, spend=5.0), name="research")
    r = await harness.limiter.acquire_levels([team], 10)
    harness.advance(2 * HOUR)  # the period ends while the request runs: its settle still lands
    await harness.limiter.settle(r, 20)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire_levels([team], 1)
    exc = info.value
    assert exc.kind == "period_ended" and not exc.retryable
    assert "The team's budget period ended at 2025-06-15T16:06:40Z" in exc.message
    # a level without a period budget, or with the period only (no amount), is not held to it
    free = Level("team", key_id, KeyLimits(period_start=START - HOUR, period_end=START + HOUR, rpm=100))
    r = await harness.limiter.acquire_levels([free], 1)
    await harness.limiter.settle(r, 1)


async def test_the_refusing_level_of_several_is_named_and_nothing_is_taken(
    harness: Harness, key_id: str
) -> None:
    at_start(harness)
    key = Level("key", key_id, KeyLimits(daily_tokens=1000))
    team = Level("team", key_id + "t", period(tokens=50), name="research")
    r = await harness.limiter.acquire_levels([team], 30)
    await harness.limiter.settle(r, 30)
    with pytest.raises(LimitExceeded) as info:
        await harness.limiter.acquire_levels([key, team], 60)
    assert info.value.level == team
    assert (await harness.limiter.usage_level(key))["daily_tokens"]["used"] == 0


async def test_a_new_period_start_counts_afresh(harness: Harness, key_id: str) -> None:
    at_start(harness)
    first = Level("team", key_id, period(tokens=100))
    r = await harness.limiter.acquire_levels([first], 100)
    await harness.limiter.settle(r, 100)
    with pytest.raises(LimitExceeded):
        await harness.limiter.acquire_levels([first], 1)
    # the same period with a larger amount keeps its count; a new start begins at zero
    larger = Level("team", key_id, period(tokens=150))
    r = await harness.limiter.acquire_levels([larger], 50)
    await harness.limiter.settle(r, 50)
    with pytest.raises(LimitExceeded):
        await harness.limiter.acquire_levels([larger], 1)
    fresh = Level("team", key_id, period(tokens=100, start=-60))
    r = await harness.limiter.acquire_levels([fresh], 100)
    await harness.limiter.settle(r, 100)
    assert (await harness.limiter.usage_level(fresh))["period"]["tokens"]["used"] == 100


async def test_concurrent_reservations_never_overshoot(harness: Harness, key_id: str) -> None:
    at_start(harness)
    team = Level("team", key_id, period(tokens=1000, spend=2.0))
    admitted: list[int] = []

    async def one() -> None:
        try:
            r = await harness.limiter.acquire_levels([team], 70, 150_000)  # 70 tokens, 0.15 reserved
        except LimitExceeded as exc:
            assert exc.kind in ("period_budget", "period_spend")
            return
        admitted.append(1)
        await asyncio.sleep(0)
        await harness.limiter.settle(r, 70, 140_000)

    await asyncio.gather(*(one() for _ in range(40)))
    usage = await harness.limiter.usage_level(team)
    assert usage["period"]["tokens"]["used"] <= 1000
    assert usage["period"]["spend"]["used"] <= 2.0
    assert usage["period"]["tokens"]["used"] == 70 * len(admitted)
    assert 13 <= len(admitted) <= 14  # 13 reservations of 0.15 fit 2.0; settled at 0.14, a 14th may


async def test_a_lost_period_counter_is_seeded_with_the_larger_of_counter_and_log(
    harness: Harness, key_id: str
) -> None:
    at_start(harness)
    harness.limiter.seed_budgets = True  # type: ignore[attr-defined]
    team = Level("team", key_id, period(tokens=1000, spend=10.0))
    with pytest.raises(SeedNeeded) as info:
        await harness.limiter.acquire_levels([team], 10)
    assert info.value.level == team
    await harness.limiter.seed_level(team, info.value.day, 0, info.value.month, 0, 0, 0, 900, 9_000_000)
    with pytest.raises(LimitExceeded) as refused:
        await harness.limiter.acquire_levels([team], 200)
    assert refused.value.kind == "period_budget" and refused.value.used == 900
    r = await harness.limiter.acquire_levels([team], 50, 500_000)
    await harness.limiter.settle(r, 50, 500_000)
    # a second seed (another worker's) does not lower or double the count
    await harness.limiter.seed_level(team, info.value.day, 0, info.value.month, 0, 0, 0, 100, 0)
    usage = await harness.limiter.usage_level(team)
    assert usage["period"]["tokens"]["used"] == 950
    assert usage["period"]["spend"]["used"] == pytest.approx(9.5)
    # a new period start needs its own seed
    moved = Level("team", key_id, period(tokens=1000, start=-60))
    with pytest.raises(SeedNeeded):
        await harness.limiter.acquire_levels([moved], 10)
    # outside the period the refusal needs no seed
    ended = Level("team", key_id, period(tokens=1000, start=-2 * HOUR, end=-HOUR))
    with pytest.raises(LimitExceeded) as out:
        await harness.limiter.acquire_levels([ended], 10)
    assert out.value.kind == "period_ended"


async def test_redis_period_counter_is_named_by_the_start_and_expires_after_the_end(
    redis_url: str, redis_prefix: str
) -> None:
    import redis.asyncio as aioredis

    from llm_backend.limits.redis import RedisLimiter

    limiter = RedisLimiter(redis_url, prefix=redis_prefix, fail_open=False, timeout_s=30, lease_s=30)
    limiter.time_offset_s = START - time.time()
    client = aioredis.Redis.from_url(redis_url)
    try:
        team = Level("team", "t1", period(tokens=100, end=10 * HOUR))
        r = await limiter.acquire_levels([team], 5)
        await limiter.settle(r, 5)
        name = f"{redis_prefix}{{team:t1}}:b:{round((START - HOUR) * 1000)}"
        assert await client.hget(name, "pu") == b"5"
        ttl = await client.ttl(name)
        assert 10 * HOUR < ttl <= 10 * HOUR + 60 + 5  # the period's end plus a lease/window
    finally:
        await limiter.close()
        await client.aclose()


async def test_a_period_to_the_end_of_the_calendar(harness: Harness, key_id: str) -> None:
    at_start(harness)
    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    first = datetime(1, 1, 1, tzinfo=UTC).timestamp()
    level = Level("key", key_id, KeyLimits(period_tokens=100, period_start=first, period_end=far))
    r = await harness.limiter.acquire_levels([level], 10)
    await harness.limiter.settle(r, 10)
    assert (await harness.limiter.usage_level(level))["period"]["tokens"]["used"] == 10


async def test_two_redis_limiters_share_one_period_budget_exactly(redis_url: str, redis_prefix: str) -> None:
    from llm_backend.limits.redis import RedisLimiter

    workers = [
        RedisLimiter(redis_url, prefix=redis_prefix, fail_open=False, timeout_s=30, pool_timeout_s=60)
        for _ in range(2)
    ]
    for w in workers:
        w.time_offset_s = START - time.time()
    team = Level("team", "shared", period(tokens=2000, spend=1.0))
    admitted = 0

    async def one(i: int) -> None:
        nonlocal admitted
        try:
            r = await workers[i % 2].acquire_levels([team], 50, 30_000)
        except LimitExceeded:
            return
        admitted += 1
        await workers[(i + 1) % 2].settle(r, 50, 25_000)  # settled by whichever worker: same counters

    try:
        await asyncio.gather(*(one(i) for i in range(100)))
        usage = await workers[0].usage_level(team)
        assert usage["period"]["tokens"]["used"] == 50 * admitted <= 2000
        assert usage["period"]["spend"]["used"] == pytest.approx(0.025 * admitted)
        assert usage["period"]["spend"]["used"] <= 1.0
        assert admitted >= 33  # 1.0 / 0.03 reservations fit at the least
    finally:
        for w in workers:
            await w.close()
