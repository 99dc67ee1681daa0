"""Rate-limited log lines: an event that repeats is logged once per interval, with how often it happened."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any


class LogThrottle:
    """Logs the first occurrence of each `key` at once, then at most one line per `interval` seconds that
    says how many times it happened since the last line. Thread-safe; the clock is injectable for tests.

        throttle = LogThrottle(logger, interval=60)
        throttle.log("db-down", logging.ERROR, "database unreachable: %s", exc)
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._state: dict[str, list[float]] = {}  # key -> [last logged at, suppressed since then]

    def log(self, key: str, level: int, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` ago; True when a line was written."""
        now = self.clock()
        with self._lock:
            state = self._state.get(key)
            if state is not None and now - state[0] < self.interval:
                state[1] += 1
                return False
            suppressed = int(state[1]) if state is not None else 0
            if state is None and len(self._state) >= self.max_keys:
                self._state.clear()  # a bound on distinct keys: forget them all rather than grow
            self._state[key] = [now, 0]
        if suppressed:
            msg = f"{msg} (and {suppressed} more times in the last {self.interval:g}s)"
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def flush(self) -> None:
        """Log the counts of keys that were suppressed and have not been logged since (e.g. on shutdown)."""
        with self._lock:
            pending = [(k, int(s[1])) for k, s in self._state.items() if s[1]]
            for k, _ in pending:
                self._state[k][1] = 0
        for key, count in pending:
            self.logger.warning("%s: %d more times since the last line", key, count)
