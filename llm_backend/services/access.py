"""Access control on the serving path: who the key is, what it may use, and its limits and budgets."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from llm_backend.config import Settings
from llm_backend.db.repositories import hash_api_key
from llm_backend.errors import AuthenticationFailed, PermissionDenied, RateLimited, ServiceUnavailable
from llm_backend.limits import (
    KeyLimits,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    make_limiter,
)
from llm_backend.services.keys import KEY_PREFIX, KeyInfo, KeyStore
from llm_backend.services.operations import CHAT_OP, Operation
from llm_backend.services.proxy import Caller
from llm_backend.upstream.router import ModelRoute

logger = logging.getLogger(__name__)

ADMIN = "admin"
CACHE_TTL = 5.0  # seconds a key looked up stays cached in the worker (changes elsewhere apply within it)
NEGATIVE_TTL = 2.0
TOUCH_EVERY = 60.0


def _no_limits(limits: KeyLimits) -> bool:
    return all(
        v is None
        for v in (limits.rpm, limits.tpm, limits.max_parallel, limits.daily_tokens, limits.monthly_tokens)
    )


class Authenticator:
    """Resolves a presented key to a principal: one hash and a cached lookup per request."""

    def __init__(self, store: KeyStore | None, admin_key: str | None, *, auth_required: bool) -> None:
        self.store = store
        self.admin_key = admin_key
        self.auth_required = auth_required
        self._cache: dict[str, tuple[float, KeyInfo | None]] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def invalidate(self) -> None:
        self._cache.clear()

    async def lookup(self, secret: str) -> KeyInfo | None:
        now = time.monotonic()
        digest = hash_api_key(secret)  # the cache holds hashes, never secrets
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self.store is None:
            return None
        info = await asyncio.to_thread(self.store.find_hash, digest)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + (CACHE_TTL if info is not None else NEGATIVE_TTL), info)
        return info

    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(key_id, 0.0) < TOUCH_EVERY or self.store is None:
            return
        self._touched[key_id] = now
        task = asyncio.get_running_loop().create_task(self._touch_later(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch_later(self, key_id: str) -> None:
        try:
            assert self.store is not None
            await asyncio.to_thread(self.store.touch, key_id)
        except Exception as exc:  # last-used is informative only
            logger.warning("could not update last use of key %s: %s", key_id, exc)

    async def __call__(self, token: str, caller: Caller) -> dict[str, Any]:
        if self.admin_key and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            caller.is_admin = True
            caller.key_id = None
            caller.log["key"] = ADMIN
            return {"sub": ADMIN, "admin": True}
        if not self.auth_required:
            return {"sub": "anonymous"}
        info = await self.lookup(token) if token.startswith(KEY_PREFIX) else None
        if info is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. You can get an API key from your llm-backend administrator."
            )
        if not info.enabled:
            raise AuthenticationFailed(f"The API key {info.key_prefix}… is disabled.", code="invalid_api_key")
        if info.expired():
            raise AuthenticationFailed(f"The API key {info.key_prefix}… has expired.", code="invalid_api_key")
        if not info.ip_allowed(caller.client_ip):
            raise PermissionDenied(
                f"The API key {info.key_prefix}… may not be used from {caller.client_ip}.",
                code="ip_not_allowed",
            )
        caller.key_id = info.id
        caller.key_name = info.name
        caller.allowed_models = info.allowed_models
        caller.limits = info.limits
        caller.log["key"] = f"{info.key_prefix}… ({info.name})"
        self._touch(info.id)
        return {"sub": info.id, "name": info.name}

    async def aclose(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


@dataclass(slots=True)
class _Admission:
    limiter: Limiter
    reservation: Any
    headers: dict[str, str]

    async def settle(self, total_tokens: int) -> None:
        await self.limiter.settle(self.reservation, total_tokens)


class Gate:
    """Reserves a request's tokens against its key's limits before forwarding; settled after."""

    def __init__(self, limiter: Limiter, default_max_tokens: int) -> None:
        self.limiter = limiter
        self.default_max_tokens = default_max_tokens

    async def __call__(
        self, caller: Caller, route: ModelRoute, body: dict[str, Any], operation: Operation = CHAT_OP
    ) -> _Admission | None:
        limits = caller.limits
        if caller.key_id is None or limits is None or _no_limits(limits):
            return None
        # the operation's own estimate (embeddings, for one, reserve only their input)
        reserve = operation.reserve(body, self.default_max_tokens)
        try:
            reservation = await self.limiter.acquire(caller.key_id, limits, reserve)
        except LimitExceeded as exc:
            retry = max(1, math.ceil(exc.retry_after))
            raise RateLimited(
                exc.message,
                code=exc.code,
                error_type="insufficient_quota" if exc.code == "insufficient_quota" else "rate_limit_error",
                headers={**exc.state.headers(), "Retry-After": str(retry)},
            ) from None
        except LimiterUnavailable:
            raise ServiceUnavailable(
                "The rate limiter is unavailable and this server is set to refuse requests it cannot count "
                "(LIMITER_FAIL_OPEN=false). Try again shortly.",
                code="limiter_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        return _Admission(self.limiter, reservation, reservation.headers())


async def setup_access(settings: Settings, resources: Any, stack: contextlib.AsyncExitStack) -> None:
    store = KeyStore(resources.engine) if resources.engine is not None else None
    resources.key_store = store
    keys = settings.auth == "keys"
    if not keys:
        logger.warning(
            "LLM_BACKEND_AUTH=none: every caller is accepted without an API key and no limits apply; "
            "never run this way where anyone else can reach the port"
        )
    if not settings.admin_key:
        logger.info("LLM_BACKEND_ADMIN_KEY is not set: the /admin routes are disabled")
    authenticator = Authenticator(store, settings.admin_key, auth_required=keys)
    stack.push_async_callback(authenticator.aclose)
    resources.authenticator = authenticator
    if not keys:
        return
    limiter = make_limiter(settings.redis_url, fail_open=settings.limiter_fail_open)
    stack.push_async_callback(limiter.close)
    resources.limiter = limiter
    resources.admit = Gate(limiter, settings.default_max_tokens)
    if not settings.redis_url and settings.web_concurrency > 1:
        logger.warning(
            "rate limits are kept in each worker's memory (no REDIS_URL) while %d workers run: a key's limits "
            "apply per worker, not in total; set REDIS_URL to enforce them exactly",
            settings.web_concurrency,
        )
    errors = getattr(limiter, "errors_total", None)
    if errors is not None:
        resources.metrics.gauge(
            "llm_backend_limiter_errors_total",
            "Rate-limiter store errors.",
            lambda: limiter.errors_total,  # type: ignore[attr-defined]
        )
