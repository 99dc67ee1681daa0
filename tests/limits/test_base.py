"""Header formatting, error codes and messages, calendar windows and make_limiter."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llm_backend.limits import InMemoryLimiter, KeyLimits, LimitExceeded, RateLimitState, make_limiter
from llm_backend.limits.base import (
    format_duration,
    rate_state,
    seconds_to_next_day,
    seconds_to_next_month,
    utc_day,
    utc_month,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.02, "20ms"),
        (0.0001, "1ms"),  # rounded up: never tell a client to come back early
        (0.999, "999ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (6.0, "6s"),
        (59.9991, "1m0s"),
        (360, "6m0s"),
        (61.5, "1m1.5s"),
        (3723.25, "1h2m3.25s"),
        (86400, "24h0m0s"),
    ],
)
def test_format_duration_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_headers_full_and_omitted() -> None:
    state = RateLimitState(
        limit_requests=60,
        remaining_requests=59,
        reset_requests_s=1.0,
        limit_tokens=150000,
        remaining_tokens=149984,
        reset_tokens_s=0.0064,
    )
    assert state.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-tokens": "7ms",
    }
    only_tokens = RateLimitState(limit_tokens=1000, remaining_tokens=-5, reset_tokens_s=360)
    assert only_tokens.headers() == {
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert RateLimitState().headers() == {}


def test_rate_state_from_bucket_levels() -> None:
    state = rate_state(KeyLimits(rpm=60, tpm=1000), requests_level=1.0, tokens_level=250.5, window_s=60)
    assert state == RateLimitState(60, 59, 1.0, 1000, 749, 15.03)
    assert rate_state(KeyLimits(), 3, 3, 60) == RateLimitState()


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("requests", "rate_limit_exceeded"),
        ("tokens", "rate_limit_exceeded"),
        ("parallel", "rate_limit_exceeded"),
        ("daily_budget", "insufficient_quota"),
        ("monthly_budget", "insufficient_quota"),
    ],
)
def test_limit_exceeded_code_and_message(kind: str, code: str) -> None:
    exc = LimitExceeded(kind, 6.0, RateLimitState(), limit=10, used=10, requested=1)  # type: ignore[arg-type]
    assert exc.code == code
    assert exc.retry_after == 6.0
    assert str(exc) == exc.message
    assert "10" in exc.message
    assert "6s" in exc.message


def test_limit_exceeded_messages_name_the_limit() -> None:
    rpm = LimitExceeded("requests", 20, RateLimitState(), limit=3, used=3, requested=1)
    assert rpm.message == (
        "Rate limit reached on requests per minute (RPM): limit 3, used 3, requested 1. "
        "Please try again in 20s."
    )
    daily = LimitExceeded("daily_budget", 3600, RateLimitState(), limit=1000, used=950, requested=100)
    assert "daily token budget" in daily.message
    assert "next UTC day, in 1h0m0s" in daily.message
    assert "lower max_tokens" in daily.message
    assert LimitExceeded("tokens", -1, RateLimitState(), limit=1, used=1, requested=1).retry_after == 0


@pytest.mark.parametrize(
    ("moment", "next_day", "next_month"),
    [
        ("2025-06-15T10:00:00", "2025-06-16", "2025-07-01"),
        ("2025-12-31T23:59:59", "2026-01-01", "2026-01-01"),
        ("2028-02-28T12:00:00", "2028-02-29", "2028-03-01"),
        ("2028-02-29T00:00:00", "2028-03-01", "2028-03-01"),
        ("2100-02-28T00:00:00", "2100-03-01", "2100-03-01"),
    ],
)
def test_utc_calendar_windows(moment: str, next_day: str, next_month: str) -> None:
    now = datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp()
    day = datetime.fromisoformat(next_day).replace(tzinfo=UTC).timestamp()
    month = datetime.fromisoformat(next_month).replace(tzinfo=UTC).timestamp()
    assert seconds_to_next_day(now) == pytest.approx(day - now)
    assert seconds_to_next_month(now) == pytest.approx(month - now)
    assert utc_day(day) == utc_day(now) + 1
    assert utc_month(month) == utc_month(now) + 1


async def test_make_limiter_without_redis_is_in_process() -> None:
    limiter = make_limiter(None, fail_open=True, window_s=2.0)
    assert isinstance(limiter, InMemoryLimiter)
    assert limiter.window_s == 2.0
    await limiter.close()


async def test_make_limiter_with_redis_url() -> None:
    from llm_backend.limits.redis import RedisLimiter

    limiter = make_limiter("redis://127.0.0.1:1/0", fail_open=False, prefix="x:")
    assert isinstance(limiter, RedisLimiter)
    assert limiter.prefix == "x:"
    assert limiter.fail_open is False
    await limiter.close()  # never connected: closing must still work
