"""Reservations on several levels at once (key, user, team), in memory and on Redis: all or nothing,
exact under concurrency, refusals naming the level, settles and seeds per level, money budgets."""

from __future__ import annotations

import asyncio

import pytest

from llm_backend.limits import KeyLimits, Level, LimitExceeded, SeedNeeded
from tests.limits.conftest import Harness


def levels(team: KeyLimits, *, key: str = "k1", user: KeyLimits | None = None) -> list[Level]:
    out = [Level("key", key, KeyLimits(rpm=10_000))]
    if user is not None:
        out.append(Level("user", "u1", user, name="ada@example.com"))
    out.append(Level("team", "t1", team, name="research"))
    return out


async def test_a_team_budget_shared_by_three_keys_never_overshoots(harness: Harness) -> None:
    limiter = harness.limiter
    team = KeyLimits(daily_tokens=1000)
    attempts = [limiter.acquire_levels(levels(team, key=f"k{i % 3}"), 70) for i in range(200)]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, LimitExceeded)]
    assert len(admitted) + len(refused) == 200
    assert len(admitted) == 1000 // 70  # exactly as many as fit, whatever the interleaving
    assert {(e.level_kind, e.kind, e.code) for e in refused} == {
        ("team", "daily_budget", "team_budget_exceeded")
    }
    usage = await limiter.usage_level(Level("team", "t1", team))
    assert usage["daily_tokens"]["used"] == 70 * len(admitted) <= 1000
    # every key level counted only its own admitted requests
    per_key = [await limiter.usage_level(Level("key", f"k{i}", KeyLimits())) for i in range(3)]
    assert sum(u["daily_tokens"]["used"] for u in per_key) == 70 * len(admitted)


async def test_a_refusal_takes_nothing_on_any_level(harness: Harness) -> None:
    limiter = harness.limiter
    user = KeyLimits(rpm=1)
    first = await limiter.acquire_levels(levels(KeyLimits(daily_tokens=500), user=user), 100)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire_levels(levels(KeyLimits(daily_tokens=500), user=user), 100)
    exc = info.value
    assert (exc.level_kind, exc.kind, exc.code) == ("user", "requests", "rate_limit_exceeded")
    assert "user 'ada@example.com'" in exc.message
    team = await limiter.usage_level(Level("team", "t1", KeyLimits(daily_tokens=500)))
    assert team["daily_tokens"]["used"] == 100  # the refused request reserved nothing on the team
    await limiter.settle(first, 40)
    team = await limiter.usage_level(Level("team", "t1", KeyLimits(daily_tokens=500)))
    key = await limiter.usage_level(Level("key", "k1", KeyLimits()))
    assert team["daily_tokens"]["used"] == key["daily_tokens"]["used"] == 40


async def test_the_longest_wait_names_the_level(harness: Harness) -> None:
    limiter = harness.limiter
    lv = [
        Level("key", "k1", KeyLimits(rpm=1)),
        Level("team", "t1", KeyLimits(monthly_tokens=100), name="research"),
    ]
    await limiter.acquire_levels(lv, 100)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire_levels(lv, 10)
    # the key's minute would pass sooner than the team's month: the team is what the client waits for
    assert info.value.level_kind == "team" and info.value.kind == "monthly_budget"
    assert info.value.retry_after > 60


async def test_parallel_slots_per_level(harness: Harness) -> None:
    limiter = harness.limiter
    team = KeyLimits(max_parallel=2)
    a = await limiter.acquire_levels(levels(team, key="a"), 1)
    await limiter.acquire_levels(levels(team, key="b"), 1)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire_levels(levels(team, key="c"), 1)
    assert info.value.kind == "parallel" and info.value.level_kind == "team"
    await limiter.settle(a, 1)
    await limiter.acquire_levels(levels(team, key="c"), 1)  # a's slot is free on the team again


async def test_money_budget_reserves_the_estimate_and_settles_the_cost(harness: Harness) -> None:
    limiter = harness.limiter
    team = KeyLimits(daily_spend=0.01)  # 10,000 millionths
    lv = levels(team)
    r1 = await limiter.acquire_levels(lv, 100, 6_000)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire_levels(lv, 100, 6_000)
    exc = info.value
    assert (exc.kind, exc.code, exc.level_kind) == ("daily_spend", "team_budget_exceeded", "team")
    assert "limit 0.01" in exc.message and "used 0.006" in exc.message
    await limiter.settle(r1, 50, 2_500)  # the real cost was lower: the difference is free again
    await limiter.acquire_levels(lv, 100, 6_000)
    usage = await limiter.usage_level(Level("team", "t1", team))
    assert usage["daily_spend"]["used"] == pytest.approx(0.0085)
    assert usage["daily_spend"]["remaining"] == pytest.approx(0.0015)


async def test_settle_is_applied_once_on_every_level(harness: Harness) -> None:
    limiter = harness.limiter
    lv = levels(KeyLimits(daily_tokens=10_000), user=KeyLimits(daily_tokens=10_000))
    r = await limiter.acquire_levels(lv, 300, 900)
    await limiter.settle(r, 120, 100)
    await limiter.settle(r, 120, 100)
    for level in lv:
        usage = await limiter.usage_level(level)
        assert usage["daily_tokens"]["used"] == 120
        assert usage["daily_spend"]["used"] == pytest.approx(0.0001)


async def test_keys_without_levels_keep_their_counters(harness: Harness) -> None:
    """A key's counter is the one it had before levels: acquire() and a one-level acquire share it."""
    limiter = harness.limiter
    limits = KeyLimits(daily_tokens=100)
    await limiter.acquire("k1", limits, 60)
    with pytest.raises(LimitExceeded) as info:
        await limiter.acquire_levels([Level("key", "k1", limits)], 60)
    assert info.value.code == "insufficient_quota"  # a key's spent budget keeps OpenAI's code
    assert (await limiter.usage("k1", limits))["daily_tokens"]["used"] == 60


async def test_missing_team_counters_ask_for_a_seed(redis_url: str, redis_prefix: str) -> None:
    from llm_backend.limits.redis import RedisLimiter

    async with RedisLimiter(redis_url, prefix=redis_prefix, seed_budgets=True, fail_open=False) as limiter:
        team = Level("team", "t9", KeyLimits(daily_spend=1.0))
        lv = [Level("key", "k9", KeyLimits(rpm=100)), team]
        with pytest.raises(SeedNeeded) as info:
            await limiter.acquire_levels(lv, 10, 10)
        assert info.value.level == team
        need = info.value
        # what the request log says the team spent today: 0.99999
        await limiter.seed_level(team, need.day, 5000, need.month, 5000, 999_990, 999_990)
        with pytest.raises(LimitExceeded) as refused:
            await limiter.acquire_levels(lv, 10, 20)
        assert refused.value.kind == "daily_spend" and refused.value.level_kind == "team"
        await limiter.acquire_levels(lv, 10, 10)
