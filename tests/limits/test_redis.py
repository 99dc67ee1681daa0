"""Redis-only behaviour: several processes share one limit, Redis's clock and calendar, TTLs, outages."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from llm_backend.limits import KeyLimits, LimiterUnavailable, LimitExceeded, Reservation
from llm_backend.limits.base import seconds_to_next_day, seconds_to_next_month, utc_day, utc_month
from llm_backend.limits.redis import RedisLimiter

CLOSED = "redis://127.0.0.1:1/0"
ROOT = Path(__file__).resolve().parents[2]

# One "app instance": its own interpreter, event loop and RedisLimiter; fires its requests at a shared moment.
WORKER = """
import asyncio, json, sys, time
from llm_backend.limits import KeyLimits, LimitExceeded
from llm_backend.limits.redis import RedisLimiter

async def main(url, prefix, key_id, start, count):
    # an hour's window: 10 requests drain in 6 minutes, so however late either process starts, the 200
    # attempts share one full bucket
    limiter = RedisLimiter(url, prefix=prefix, fail_open=False, window_s=3600, timeout_s=30, pool_timeout_s=60)
    limits = KeyLimits(rpm=10, max_parallel=100)
    await limiter.usage(key_id, limits)  # connect and load the scripts before the start
    await asyncio.sleep(max(0.0, start - time.time()))

    async def one():
        try:
            r = await limiter.acquire(key_id, limits, 10)
        except LimitExceeded as exc:
            return exc.kind
        await asyncio.sleep(0.01)
        await limiter.settle(r, 5)
        return "ok"

    kinds = await asyncio.gather(*(one() for _ in range(count)))
    await limiter.close()
    print(json.dumps(kinds))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])))
"""


async def test_two_processes_enforce_one_rpm_together(redis_url: str, redis_prefix: str, key_id: str) -> None:
    start = time.time() + 2.0
    args = [redis_url, redis_prefix, key_id, repr(start), "100"]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, *args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [await p.communicate() for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    kinds = [json.loads(out) for out, _ in outputs]

    ok = sum(k.count("ok") for k in kinds)
    assert ok == 10
    assert sum(k.count("requests") for k in kinds) == 190
    async with RedisLimiter(redis_url, prefix=redis_prefix) as limiter:
        usage = await limiter.usage(key_id, KeyLimits(rpm=10, max_parallel=100))
    assert usage["parallel"]["in_flight"] == 0
    assert usage["daily_tokens"]["used"] == 10 * 5


async def test_real_time_window_of_a_few_seconds(redis_url: str, redis_prefix: str, key_id: str) -> None:
    # Redis TIME, no offset: the bucket really drains. A window of 4 s (one request per 2 s) leaves the three
    # acquisitions 2 s to happen in before the third would fit again, however busy the machine.
    async with RedisLimiter(redis_url, prefix=redis_prefix, window_s=4.0) as limiter:
        limits = KeyLimits(rpm=2)
        await limiter.acquire(key_id, limits, 1)
        await limiter.acquire(key_id, limits, 1)
        with pytest.raises(LimitExceeded) as info:
            await limiter.acquire(key_id, limits, 1)
        assert 0 < info.value.retry_after <= 2.0
        await asyncio.sleep(info.value.retry_after + 0.05)
        await limiter.acquire(key_id, limits, 1)


@pytest.mark.parametrize(
    "moment",
    [
        "2025-06-15T10:00:00",
        "2025-12-31T23:59:58",
        "2026-01-31T23:00:00",
        "2028-02-29T23:59:50",
        "2100-02-28T12:00:00",
        "2400-02-29T01:00:00",
    ],
)
async def test_lua_calendar_matches_python(
    redis_url: str, redis_prefix: str, key_id: str, moment: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    sec, usec = await client.time()
    await client.aclose()
    target = datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp()
    offset = target - (sec + usec / 1e6)
    async with RedisLimiter(redis_url, prefix=redis_prefix, time_offset_s=offset) as limiter:
        r = await limiter.acquire(key_id, KeyLimits(daily_tokens=5, monthly_tokens=10), 5)
        assert r.acquired_at == pytest.approx(target, abs=2)
        assert r.day == utc_day(r.acquired_at)
        assert r.month == utc_month(r.acquired_at)
        with pytest.raises(LimitExceeded) as daily:
            await limiter.acquire(key_id, KeyLimits(daily_tokens=5), 1)
        assert daily.value.retry_after == pytest.approx(seconds_to_next_day(r.acquired_at), abs=1)
        with pytest.raises(LimitExceeded) as monthly:
            await limiter.acquire(key_id, KeyLimits(monthly_tokens=5), 1)
        assert monthly.value.retry_after == pytest.approx(seconds_to_next_month(r.acquired_at), abs=1)


async def test_keys_expire(redis_url: str, redis_prefix: str, key_id: str) -> None:
    async with RedisLimiter(redis_url, prefix=redis_prefix, lease_s=120) as limiter:
        await limiter.acquire(key_id, KeyLimits(rpm=5, max_parallel=2, monthly_tokens=100), 10)
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*")]
        assert len(keys) == 2
        for key in keys:
            ttl = await client.ttl(key)
            assert ttl > 0, key
            assert ttl <= 32 * 86400 + 120
        assert 0 < await client.ttl(f"{redis_prefix}{{{key_id}}}:p") <= 121
    finally:
        await client.aclose()


async def test_fail_open_lets_requests_through_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisLimiter(CLOSED, fail_open=True, timeout_s=0.5)
    limits = KeyLimits(rpm=1, tpm=100)
    with caplog.at_level(logging.ERROR, logger="llm_backend.limits.redis"):
        reservations = [await limiter.acquire("k", limits, 10) for _ in range(5)]
    assert all(r.degraded for r in reservations)
    assert reservations[0].headers() == {"x-ratelimit-limit-requests": "1", "x-ratelimit-limit-tokens": "100"}
    assert limiter.errors_total == 1  # later requests skip Redis during the back-off
    assert limiter.degraded_total == 5
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "Redis unavailable" in errors[0].getMessage()
    assert "letting requests through" in errors[0].getMessage()

    limiter._down_until = 0.0  # back-off over: Redis is tried again and the failure counted
    await limiter.acquire("k", limits, 10)
    assert limiter.errors_total == 2
    for r in reservations:
        await limiter.settle(r, 10)  # nothing to settle for a degraded reservation
        assert r.settled
    assert limiter.errors_total == 2
    await limiter.close()


async def test_fail_closed_raises_unavailable() -> None:
    limiter = RedisLimiter(CLOSED, fail_open=False, timeout_s=0.5)
    with pytest.raises(LimiterUnavailable):
        await limiter.acquire("k", KeyLimits(rpm=1), 10)
    with pytest.raises(LimiterUnavailable):
        await limiter.acquire("k", KeyLimits(rpm=1), 10)  # during the back-off, without trying
    with pytest.raises(LimiterUnavailable):
        await limiter.usage("k", KeyLimits(rpm=1))
    assert limiter.errors_total >= 1
    await limiter.close()


async def test_settle_swallows_an_outage(redis_url: str, redis_prefix: str, key_id: str) -> None:
    async with RedisLimiter(redis_url, prefix=redis_prefix) as limiter:
        r = await limiter.acquire(key_id, KeyLimits(max_parallel=1), 10)
    broken = RedisLimiter(CLOSED, prefix=redis_prefix, fail_open=False, timeout_s=0.5)
    await broken.settle(r, 3)  # logged and counted, never raised: the response is already out
    assert broken.errors_total == 1
    assert r.settled
    await broken.close()


async def test_shared_client_is_not_closed(redis_url: str, redis_prefix: str, key_id: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, prefix=redis_prefix)
    r: Reservation = await limiter.acquire(key_id, KeyLimits(rpm=3), 1)
    assert r.state.remaining_requests == 2
    await limiter.close()
    assert await client.ping()
    await client.aclose()
