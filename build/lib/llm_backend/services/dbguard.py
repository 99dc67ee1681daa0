"""Database calls a request waits for: own threads, a deadline, a back-off after a failure, throttled logs."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from llm_backend.db.session import DatabaseUnavailable, unavailable_error
from llm_backend.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DatabaseGuard:
    """Runs blocking database calls of the serving path (key look-ups, budget seeding, last-use updates).

    - In a small thread pool of its own: a database that hangs holds at most `max_threads` threads, never
      the event loop's default executor that the rest of the worker uses.
    - With a deadline (`timeout_s`): the caller gets DatabaseUnavailable when it passes, even if the thread
      is still stuck in a socket read (a stopped server answers nothing, so a statement timeout cannot fire).
    - After a failure the database is left alone for `retry_interval_s`; then one probe call goes through
      while the others fail at once, so an outage costs no timeout per request and piles up no threads.
    - Failures are logged once per `log_interval_s` per kind of call, with how often they happened.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        retry_interval_s: float = 2.0,
        max_threads: int = 8,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.max_threads = max_threads
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="db-request")
        self._down_until = 0.0
        self._failing = False
        self._probing = False
        self._busy = 0  # calls submitted and not finished in their thread (stuck ones included)
        self.throttle = LogThrottle(logger, log_interval_s, clock=clock)
        self.failures_total = 0

    @property
    def retry_after_s(self) -> int:
        """Seconds a client should wait before trying again (the Retry-After of a 503)."""
        return max(1, math.ceil(max(self._down_until - self._clock(), self.retry_interval_s)))

    @property
    def available(self) -> bool:
        """False while the guard backs off after a failure."""
        return not self._failing

    async def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a guard thread; DatabaseUnavailable on an outage, a timeout or during the back-off."""
        now = self._clock()
        probe = False
        if self._failing:
            if now < self._down_until or self._probing:
                raise DatabaseUnavailable("the database was unreachable moments ago (backing off)")
            probe = self._probing = True
        if self._busy >= self.max_threads:
            if probe:
                self._probing = False
            raise DatabaseUnavailable("every database thread is waiting for an answer")
        loop = asyncio.get_running_loop()
        self._busy += 1
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        future.add_done_callback(self._finished)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            self._failed(what, DatabaseUnavailable(f"no answer within {self.timeout_s:g}s"))
            raise DatabaseUnavailable(f"the database did not answer within {self.timeout_s:g}s") from None
        except Exception as exc:
            down = unavailable_error(exc)
            if down is None:
                if probe:
                    self._probing = False
                raise
            self._failed(what, down)
            raise down from exc
        finally:
            if probe:
                self._probing = False
        if self._failing:
            self._failing = False
            logger.warning("database reachable again (%s answered)", what)
        return result

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self._busy -= 1
        if not future.cancelled():
            future.exception()  # retrieved: the answer of a call whose caller gave up is dropped quietly

    def _failed(self, what: str, exc: DatabaseUnavailable) -> None:
        self.failures_total += 1
        self._failing = True
        self._down_until = self._clock() + self.retry_interval_s
        self.throttle.log(
            f"database:{what}",
            logging.ERROR,
            "database unavailable during %s: %s; serving what the caches hold, retrying every %gs",
            what,
            exc,
            self.retry_interval_s,
        )

    def close(self) -> None:
        """Stop the threads that are idle; a thread stuck on a hung database is left to finish on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
