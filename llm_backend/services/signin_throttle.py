"""The console's sign-in throttle: failed sign-ins per client address, refused for a while past a limit."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from llm_backend.logthrottle import LogThrottle

logger = logging.getLogger(__name__)
_throttle = LogThrottle(logger, 60.0)

MAX_FAILURES = 5  # failed sign-ins from one address ...
WINDOW_S = 15 * 60.0  # ... within this long: its next attempts are refused until the oldest ages out
MAX_ADDRESSES = 10_000  # addresses tracked per worker in memory (the least recently failing go first)
REDIS_PREFIX = "llmb:signin:"
REDIS_BACKOFF_S = 5.0  # after a Redis failure, memory alone for this long (no timeout per sign-in meanwhile)


def now() -> float:
    """The throttle's clock (wall time: workers that share Redis agree on it); tests replace it."""
    return time.time()


class SignInThrottle:
    """Counts failed sign-ins per client address over a sliding window of `window_s`.

    After `max_failures` failures within the window, `retry_after` says how long the address must wait
    (the sign-in is then answered without checking what it presents); a successful sign-in clears the
    address's failures. With a Redis client the counts are shared by every worker (a sorted set per
    address, expiring with its window); when Redis fails, this worker counts in its own memory until Redis
    answers again. In memory at most `max_addresses` addresses are kept, the least recently failing
    dropped first."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        max_addresses: int = MAX_ADDRESSES,
        redis: Any = None,
        prefix: str = REDIS_PREFIX,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self.redis = redis  # redis.asyncio.Redis, or None
        self.prefix = prefix
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.redis_errors_total = 0
        self._redis_down_until = 0.0  # monotonic

    def _use_redis(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_down_until

    def _now(self) -> float:
        return self._clock() if self._clock is not None else now()

    @staticmethod
    def _address(ip: str | None) -> str:
        return ip or "unknown"

    # -- the three calls ------------------------------------------------------------------------------

    async def retry_after(self, ip: str | None) -> int | None:
        """Seconds until `ip` may try again (None: it may now)."""
        address, at = self._address(ip), self._now()
        if self._use_redis():
            try:
                return await self._redis_retry_after(address, at)
            except Exception as exc:
                self._redis_failed(exc)
        return self._memory_retry_after(address, at)

    async def failed(self, ip: str | None) -> int | None:
        """Count a failed sign-in of `ip`; returns retry_after once this failure reaches the limit."""
        address, at = self._address(ip), self._now()
        if self._use_redis():
            try:
                count = await self._redis_failed_at(address, at)
            except Exception as exc:
                self._redis_failed(exc)
            else:
                return self._limit_reached(address, count)
        return self._limit_reached(address, self._memory_failed_at(address, at))

    async def succeeded(self, ip: str | None) -> None:
        """A sign-in of `ip` succeeded: its failures are forgotten."""
        address = self._address(ip)
        self._failures.pop(address, None)
        if self._use_redis():
            try:
                await self.redis.delete(self.prefix + address)
            except Exception as exc:
                self._redis_failed(exc)

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    # -- memory ---------------------------------------------------------------------------------------

    def _window(self, address: str, at: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= at - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def _memory_retry_after(self, address: str, at: float) -> int | None:
        times = self._window(address, at)
        if times is None or len(times) < self.max_failures:
            return None
        return _ceil(times[len(times) - self.max_failures] + self.window_s - at)

    def _memory_failed_at(self, address: str, at: float) -> int:
        times = self._window(address, at)
        if times is None:
            times = deque(maxlen=self.max_failures)
            while len(self._failures) >= self.max_addresses:
                self._failures.popitem(last=False)
            self._failures[address] = times
        else:
            self._failures.move_to_end(address)
        times.append(at)
        return len(times)

    # -- Redis ----------------------------------------------------------------------------------------

    async def _redis_retry_after(self, address: str, at: float) -> int | None:
        key = self.prefix + address
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", at - self.window_s)
            pipe.zrange(key, -self.max_failures, -self.max_failures, withscores=True)
            _, oldest = await pipe.execute()
        if not oldest:  # fewer than max_failures in the window
            return None
        return _ceil(float(oldest[0][1]) + self.window_s - at)

    async def _redis_failed_at(self, address: str, at: float) -> int:
        key = self.prefix + address
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", at - self.window_s)
            pipe.zadd(key, {f"{at:.6f}:{secrets.token_hex(4)}": at})
            pipe.zremrangebyrank(key, 0, -(self.max_failures + 1))  # the newest max_failures are enough
            pipe.zcard(key)
            pipe.expire(key, math.ceil(self.window_s) + 1)
            results = await pipe.execute()
        return int(results[3])

    def _redis_failed(self, exc: Exception) -> None:
        self.redis_errors_total += 1
        self._redis_down_until = time.monotonic() + REDIS_BACKOFF_S
        _throttle.log(
            "signin-redis",
            logging.WARNING,
            "console sign-in throttle: Redis failed (%s); counting failed sign-ins in this worker's memory",
            type(exc).__name__,
        )

    def _limit_reached(self, address: str, count: int) -> int | None:
        if count < self.max_failures:
            return None
        if count == self.max_failures:
            logger.warning(
                "console sign-ins from %s refused for up to %ds: %d failed within %ds",
                address,
                _ceil(self.window_s),
                count,
                _ceil(self.window_s),
            )
        return _ceil(self.window_s)


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))


def make_signin_throttle(redis_url: str | None, *, timeout_s: float = 1.0) -> SignInThrottle:
    """The worker's throttle: shared through Redis when REDIS_URL is set, else in memory."""
    if not redis_url:
        return SignInThrottle()
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url,
        max_connections=4,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return SignInThrottle(redis=aioredis.Redis.from_pool(pool))
