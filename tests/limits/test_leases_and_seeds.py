"""Leases renewed while a request lives, settles retried and applied once, budget windows seeded once."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from llm_backend.limits import KeyLimits, LimitExceeded, SeedNeeded
from llm_backend.limits.base import utc_day
from llm_backend.limits.redis import RedisLimiter
from tests.e2e_access.private_services import private_redis, wait_for
from tests.limits.conftest import Harness, delete_prefix


async def test_a_lost_budget_window_admits_nothing_until_seeded(harness: Harness, key_id: str) -> None:
    harness.limiter.seed_budgets = True  # type: ignore[attr-defined]
    limits = KeyLimits(daily_tokens=100, monthly_tokens=1000)
    with pytest.raises(SeedNeeded) as need:
        await harness.limiter.acquire(key_id, limits, 10)
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["daily_tokens"]["used"] == 0 and usage["parallel"]["in_flight"] == 0  # nothing was taken
    await harness.limiter.seed(key_id, need.value.day, 95, need.value.month, 400)
    await harness.limiter.seed(key_id, need.value.day, 10, need.value.month, 10)  # a second seed: ignored
    with pytest.raises(LimitExceeded) as refused:
        await harness.limiter.acquire(key_id, limits, 10)
    assert refused.value.kind == "daily_budget"
    r = await harness.limiter.acquire(key_id, limits, 5)
    await harness.limiter.settle(r, 5)
    usage = await harness.limiter.usage(key_id, limits)
    assert usage["daily_tokens"]["used"] == 100
    assert usage["monthly_tokens"]["used"] == 405
    # a key without a budget never asks
    await harness.limiter.acquire(f"{key_id}-free", KeyLimits(rpm=10), 5)


async def test_a_seed_keeps_what_the_counter_already_has(harness: Harness, key_id: str) -> None:
    """A budget added in the middle of a day: the counter saw today's requests, the log has them too."""
    r = await harness.limiter.acquire(key_id, KeyLimits(), 60)
    await harness.limiter.settle(r, 60)
    harness.limiter.seed_budgets = True  # type: ignore[attr-defined]
    with pytest.raises(SeedNeeded) as need:
        await harness.limiter.acquire(key_id, KeyLimits(daily_tokens=100), 10)
    await harness.limiter.seed(key_id, need.value.day, 50, need.value.month, 50)  # the log lags behind
    usage = await harness.limiter.usage(key_id, KeyLimits(daily_tokens=100))
    assert usage["daily_tokens"]["used"] == 60  # max(60, 50), not 110


async def test_a_new_day_asks_again_and_a_stale_seed_is_ignored(harness: Harness, key_id: str) -> None:
    harness.limiter.seed_budgets = True  # type: ignore[attr-defined]
    limits = KeyLimits(daily_tokens=100)
    with pytest.raises(SeedNeeded) as first:
        await harness.limiter.acquire(key_id, limits, 10)
    await harness.limiter.seed(key_id, first.value.day, 0, first.value.month, 0)
    await harness.limiter.acquire(key_id, limits, 10)
    harness.advance(86400)
    with pytest.raises(SeedNeeded) as second:
        await harness.limiter.acquire(key_id, limits, 10)
    assert second.value.day == first.value.day + 1
    await harness.limiter.seed(key_id, first.value.day, 99, first.value.month, 99)  # yesterday's: ignored
    with pytest.raises(SeedNeeded):
        await harness.limiter.acquire(key_id, limits, 10)


async def test_memory_lease_lives_as_long_as_its_reservation() -> None:
    from llm_backend.limits import InMemoryLimiter
    from tests.limits.conftest import FakeClock

    clock = FakeClock()
    limiter = InMemoryLimiter(clock=clock, lease_s=30)
    limits = KeyLimits(max_parallel=1)
    held = await limiter.acquire("k", limits, 1)
    clock.advance(3600)  # a stream of an hour keeps its slot
    with pytest.raises(LimitExceeded):
        await limiter.acquire("k", limits, 1)
    assert not held.settled
    del held  # dropped without settle (a bug): the lease runs out
    gc.collect()
    with pytest.raises(LimitExceeded):
        await limiter.acquire("k", limits, 1)
    clock.advance(31)
    await limiter.acquire("k", limits, 1)


async def test_redis_lease_is_renewed_while_the_request_lives(redis_url: str, redis_prefix: str) -> None:
    async with RedisLimiter(redis_url, prefix=redis_prefix, lease_s=0.6) as limiter:
        limits = KeyLimits(max_parallel=1)
        held = await limiter.acquire("k", limits, 10)
        await asyncio.sleep(2.0)  # three leases long
        with pytest.raises(LimitExceeded) as info:
            await limiter.acquire("k", limits, 10)
        assert info.value.kind == "parallel"
        await limiter.settle(held, 10)
        await limiter.acquire("k", limits, 10)


async def test_redis_settle_applies_once(redis_url: str, redis_prefix: str) -> None:
    async with RedisLimiter(redis_url, prefix=redis_prefix) as limiter:
        limits = KeyLimits(daily_tokens=1000)
        r = await limiter.acquire("k", limits, 100)
        assert await limiter._settle_once(r, 30)
        assert await limiter._settle_once(r, 30)  # a retry whose first attempt had landed
        usage = await limiter.usage("k", limits)
        assert usage["daily_tokens"]["used"] == 30
        assert usage["parallel"]["in_flight"] == 0


@pytest.mark.fault
async def test_settles_during_a_redis_pause_land_once_when_it_answers() -> None:
    prefix = "test:llmb:pause:"
    with private_redis() as server:
        limiter = RedisLimiter(server.url, prefix=prefix, timeout_s=0.5, lease_s=600, fail_open=True)
        limits = KeyLimits(max_parallel=2, daily_tokens=1000)
        a = await limiter.acquire("k", limits, 100)
        b = await limiter.acquire("k", limits, 100)
        server.pause()
        started = time.monotonic()
        await limiter.settle(a, 30)  # times out: queued, the response is not held up for long
        await limiter.settle(b, 40)
        assert time.monotonic() - started < 10
        assert limiter.settle_retries_total == 2
        await asyncio.sleep(1.0)
        server.resume()
        client = server.client()
        await asyncio.to_thread(
            wait_for, lambda: client.zcard(f"{prefix}{{k}}:p") == 0, 30, 0.05, "the settles to land"
        )
        await asyncio.to_thread(wait_for, lambda: not limiter._pending, 30, 0.05, "the retry queue to drain")
        usage = await limiter.usage("k", limits)
        assert usage["daily_tokens"]["used"] == 70  # each settle applied exactly once
        assert usage["daily_tokens"]["used"] == int(client.hget(f"{prefix}{{k}}:s", "du"))
        assert int(client.hget(f"{prefix}{{k}}:s", "d")) == utc_day(time.time())
        client.close()
        await limiter.close()
        await delete_prefix(server.url, prefix)
