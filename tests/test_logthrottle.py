"""LogThrottle: once per interval per key, with the count of what was held back."""

from __future__ import annotations

import logging

import pytest

from llm_backend.logthrottle import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeats_are_counted_and_reported_after_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = LogThrottle(logging.getLogger("t.throttle"), interval=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="t.throttle"):
        assert throttle.log("db", logging.ERROR, "database down: %s", "refused")
        for _ in range(5):
            assert not throttle.log("db", logging.ERROR, "database down: %s", "refused")
        assert throttle.log("other", logging.ERROR, "another thing")
        clock.now += 61
        assert throttle.log("db", logging.ERROR, "database down: %s", "refused")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "database down: refused",
        "another thing",
        "database down: refused (and 5 more times in the last 60s)",
    ]


def test_flush_reports_held_back_counts(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = LogThrottle(logging.getLogger("t.throttle2"), interval=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="t.throttle2"):
        throttle.log("k", logging.WARNING, "x")
        throttle.log("k", logging.WARNING, "x")
        throttle.flush()
        throttle.flush()
    assert [r.getMessage() for r in caplog.records] == ["x", "k: 1 more times since the last line"]
