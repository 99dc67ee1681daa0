"""State affinity: remember which backend created each stored response, in memory and in the database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from llm_backend.logthrottle import LogThrottle

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Owner:
    """The backend that holds a stored response (and the conversation its chain is recorded in)."""

    response_id: str
    model: str
    backend: str
    key_id: str | None = None
    conversation_id: str | None = None


class ResponseOwners:
    """Owners of stored responses for every worker and replica: a bounded in-memory map in front of the
    response_owners table. New owners are written behind, in small batches (never on the request's path);
    a lookup that misses waits up to `grace` seconds for another worker's write to land before it gives up.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        guard: Any = None,
        cache_size: int = 100_000,
        flush_interval: float = 0.02,
        grace: float = 1.0,
    ) -> None:
        self.engine = engine
        self.guard = guard  # llm_backend.services.dbguard.DatabaseGuard: look-ups with a deadline
        self.cache_size = cache_size
        self.flush_interval = flush_interval
        self.grace = grace
        self._cache: OrderedDict[str, Owner] = OrderedDict()
        self._pending: list[Owner] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._throttle = LogThrottle(logger, 60.0)

    async def start(self) -> None:
        if self.engine is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._writer())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush()

    def remember(self, owner: Owner) -> None:
        self._keep(owner)
        if self.engine is not None:
            self._pending.append(owner)
            self._wake.set()

    def _keep(self, owner: Owner) -> None:
        cache = self._cache
        cache[owner.response_id] = owner
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    async def find(self, response_id: str) -> Owner | None:
        """The owner of a response, None when it is unknown. Raises DatabaseUnavailable when the database
        could not be asked (then nobody can tell: the caller answers 503, not 404)."""
        hit = self._cache.get(response_id)
        if hit is not None or self.engine is None:
            return hit
        deadline = time.monotonic() + self.grace
        while True:
            owner = await self._load(response_id)
            if owner is not None:
                self._keep(owner)
                return owner
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)
            hit = self._cache.get(response_id)
            if hit is not None:
                return hit

    async def _load(self, response_id: str) -> Owner | None:
        from llm_backend.db.owners import find_owner
        from llm_backend.db.session import DatabaseUnavailable, unavailable_error

        try:
            if self.guard is not None:
                row = await self.guard.run("response owner look-up", find_owner, self.engine, response_id)
            else:
                row = await asyncio.to_thread(find_owner, self.engine, response_id)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            down = unavailable_error(exc)
            if down is not None:
                raise down from None
            self._throttle.log(
                "owner-lookup", logging.WARNING, "looking up the owner of a stored response failed: %s", exc
            )
            raise DatabaseUnavailable(f"{type(exc).__name__}") from None
        return Owner(**row) if row is not None else None

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_interval)  # gather what arrives meanwhile into one transaction
            await self._flush()

    async def _flush(self) -> None:
        from llm_backend.db.owners import insert_owners

        batch, self._pending = self._pending, []
        if not batch or self.engine is None:
            return
        rows = [
            {
                "response_id": o.response_id,
                "model": o.model,
                "backend": o.backend,
                "key_id": o.key_id,
                "conversation_id": o.conversation_id,
            }
            for o in batch
        ]
        try:
            if self.guard is not None:
                await self.guard.run("response owners write", insert_owners, self.engine, rows)
            else:
                await asyncio.to_thread(insert_owners, self.engine, rows)
        except Exception as exc:  # this worker still knows them; others will not until it works again
            self._throttle.log(
                "owner-store",
                logging.WARNING,
                "storing the owners of %d responses failed: %s",
                len(rows),
                exc,
            )
            if len(self._pending) < 10_000:
                self._pending[:0] = batch
