"""Rate limiting: per-key RPM/TPM, parallel slots and daily/monthly token budgets, in-process or on Redis."""

from __future__ import annotations

import logging
from typing import Any

from .base import (
    MICROS,
    KeyLimits,
    Level,
    LevelKind,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    Limits,
    RateLimitState,
    Reservation,
    SeedNeeded,
    format_duration,
    month_start,
    to_micros,
)
from .estimate import estimate_tokens
from .memory import InMemoryLimiter

logger = logging.getLogger(__name__)


def make_limiter(redis_url: str | None, *, fail_open: bool, **options: Any) -> Limiter:
    """RedisLimiter when a Redis URL is given (exact across workers and replicas), else InMemoryLimiter
    (exact within one worker only). options go to the implementation (window_s, lease_s, prefix, ...)."""
    if redis_url:
        from .redis import RedisLimiter

        return RedisLimiter(redis_url, fail_open=fail_open, **options)
    options.pop("prefix", None)
    return InMemoryLimiter(
        **{k: v for k, v in options.items() if k in ("window_s", "lease_s", "clock", "seed_budgets")}
    )


__all__ = [
    "MICROS",
    "InMemoryLimiter",
    "KeyLimits",
    "Level",
    "LevelKind",
    "LimitExceeded",
    "Limiter",
    "LimiterUnavailable",
    "Limits",
    "RateLimitState",
    "Reservation",
    "SeedNeeded",
    "estimate_tokens",
    "format_duration",
    "make_limiter",
    "month_start",
    "to_micros",
]
