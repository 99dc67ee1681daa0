"""Limiter test fixtures: the in-process limiter on a fake clock and, with TEST_REDIS_URL, Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from llm_backend.limits import InMemoryLimiter, Limiter

# 2025-06-15T10:13:20Z: a plain mid-month, mid-day moment.
START = 1_750_000_000.0


class FakeClock:
    """A wall clock the tests move by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    """A limiter under test plus a way to move its time forward."""

    name: str
    limiter: Limiter
    advance: Callable[[float], None]


def redis_url_or_skip() -> str:
    url = os.environ.get("TEST_REDIS_URL")
    if not url:
        pytest.skip(
            "TEST_REDIS_URL is not set: Redis limiter tests need a Redis (e.g. redis://127.0.0.1:6379/15)"
        )
    return url


@pytest.fixture
def redis_url() -> str:
    return redis_url_or_skip()


@pytest.fixture
def key_id() -> str:
    return f"key-{uuid.uuid4().hex[:12]}"


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under a test's prefix."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to the test; every key under it is deleted afterwards."""
    prefix = f"test:llmb:rl:{uuid.uuid4().hex[:12]}:"
    yield prefix
    await delete_prefix(redis_url, prefix)


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The same behaviour tests run against both implementations."""
    if request.param == "memory":
        clock = FakeClock()
        yield Harness("memory", InMemoryLimiter(clock=clock), clock.advance)
        return
    from llm_backend.limits.redis import RedisLimiter

    url = redis_url_or_skip()
    prefix = f"test:llmb:rl:{uuid.uuid4().hex[:12]}:"
    # a loaded machine can take longer than the 1 s production timeout to answer: tests wait for Redis
    limiter = RedisLimiter(url, prefix=prefix, fail_open=False, timeout_s=30, pool_timeout_s=60)

    def advance(seconds: float) -> None:
        # Test hook: shifts the Redis TIME the scripts see, so windows and days pass without sleeping.
        limiter.time_offset_s += seconds

    try:
        yield Harness("redis", limiter, advance)
    finally:
        await limiter.close()
        await delete_prefix(url, prefix)
