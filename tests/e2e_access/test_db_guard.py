"""The serving path's database calls: deadline, back-off, one probe at a time, bounded threads; the key cache
serving stale entries during an outage (bounded), 503 for unknown keys, and changes applied at once."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from llm_backend.db.session import DatabaseUnavailable
from llm_backend.errors import AuthenticationFailed, ServiceUnavailable
from llm_backend.limits import KeyLimits
from llm_backend.services import access
from llm_backend.services.access import Authenticator
from llm_backend.services.dbguard import DatabaseGuard
from llm_backend.services.keys import KeyInfo
from llm_backend.services.proxy import Caller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_deadline_backoff_and_a_single_probe() -> None:
    clock = Clock()
    guard = DatabaseGuard(0.2, retry_interval_s=5.0, max_threads=2, clock=clock)
    hang = threading.Event()
    calls = 0

    def stuck() -> int:
        nonlocal calls
        calls += 1
        hang.wait(30)
        return 1

    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        await guard.run("look-up", stuck)
    assert time.monotonic() - started < 10  # the deadline, not the hang
    assert guard.retry_after_s == 5
    with pytest.raises(DatabaseUnavailable):  # backing off: the database is not even asked
        await guard.run("look-up", stuck)
    assert calls == 1 and not guard.available
    clock.now += 6
    probes = await asyncio.gather(*(guard.run("look-up", stuck) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(p, DatabaseUnavailable) for p in probes)
    assert calls == 2  # one probe went through, the others failed at once
    clock.now += 6
    with pytest.raises(DatabaseUnavailable, match="every database thread"):
        await guard.run("look-up", stuck)  # both threads are stuck: nothing more is queued behind them
    hang.set()
    await asyncio.sleep(0.2)
    clock.now += 6
    assert await guard.run("look-up", lambda: 42) == 42
    assert guard.available
    guard.close()


async def test_errors_that_are_not_outages_pass_through() -> None:
    guard = DatabaseGuard(1.0)

    def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await guard.run("x", broken)
    assert guard.available and guard.failures_total == 0
    guard.close()


def info(key_id: str = "key_1", enabled: bool = True) -> KeyInfo:
    return KeyInfo(
        id=key_id,
        name="n",
        owner=None,
        key_prefix="sk-llmb-abcd",
        allowed_models=None,
        allowed_networks=None,
        limits=KeyLimits(),
        expires_at=None,
        enabled=enabled,
    )


class FakeStore:
    def __init__(self) -> None:
        self.listeners: list[Any] = []
        self.down = False
        self.keys: dict[str, KeyInfo] = {}
        self.lookups = 0

    def find_hash(self, digest: str) -> KeyInfo | None:
        self.lookups += 1
        if self.down:
            raise DatabaseUnavailable("connection refused")
        return self.keys.get(digest)


SECRET = "sk-llmb-" + "a" * 43
OTHER = "sk-llmb-" + "b" * 43


async def test_stale_keys_during_an_outage_for_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "CACHE_TTL", 0.0)  # every request asks the database
    store = FakeStore()
    store.keys[access.hash_api_key(SECRET)] = info()
    auth = Authenticator(
        store, None, auth_required=True, guard=DatabaseGuard(1.0, retry_interval_s=0.0), stale_s=0.5
    )
    caller = Caller(request_id="r", route="/v1/chat/completions")
    assert (await auth(SECRET, caller))["sub"] == "key_1"
    store.down = True
    assert (await auth(SECRET, caller))["sub"] == "key_1"  # from the cache
    with pytest.raises(ServiceUnavailable) as unknown:
        await auth(OTHER, caller)
    assert unknown.value.status_code == 503 and unknown.value.headers["Retry-After"].isdigit()
    assert unknown.value.code == "database_unavailable"
    auth.invalidate()  # an admin change elsewhere: looked up again, but still the fallback
    assert (await auth(SECRET, caller))["sub"] == "key_1"
    await asyncio.sleep(0.6)  # older than stale_s: no longer trusted
    with pytest.raises(ServiceUnavailable):
        await auth(SECRET, caller)
    store.down = False
    assert (await auth(SECRET, caller))["sub"] == "key_1"
    await auth.aclose()


async def test_a_change_through_the_store_applies_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    store = FakeStore()
    store.keys[access.hash_api_key(SECRET)] = info()
    auth = Authenticator(store, None, auth_required=True, guard=DatabaseGuard(1.0))
    caller = Caller(request_id="r", route="/v1/chat/completions")
    await auth(SECRET, caller)
    store.down = True
    for listener in store.listeners:  # KeyStore.update(..., enabled=False) calls them after its commit
        listener("key_1", info(enabled=False))
    with pytest.raises(AuthenticationFailed, match="disabled"):
        await auth(SECRET, caller)
    for listener in store.listeners:  # deleted
        listener("key_1", None)
    with pytest.raises(ServiceUnavailable):
        await auth(SECRET, caller)
    await auth.aclose()


async def test_one_lookup_for_many_concurrent_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    store = FakeStore()
    store.keys[access.hash_api_key(SECRET)] = info()
    auth = Authenticator(store, None, auth_required=True, guard=DatabaseGuard(1.0))
    found = await asyncio.gather(*(auth.lookup(SECRET) for _ in range(20)))
    assert all(f is not None and f.id == "key_1" for f in found)
    assert store.lookups == 1
    await auth.aclose()


class FailingTotals:
    listeners: list[Any] = []

    def token_totals(self, *args: Any) -> tuple[int, int]:
        raise DatabaseUnavailable("connection refused")

    def level_totals(self, *args: Any) -> tuple[int, int, float, float]:
        raise DatabaseUnavailable("connection refused")


@pytest.mark.parametrize("fail_open", [True, False])
async def test_budget_seeding_without_the_request_log(fail_open: bool) -> None:
    from llm_backend.limits import InMemoryLimiter
    from llm_backend.services.access import Gate
    from llm_backend.upstream.router import ModelRoute

    limiter = InMemoryLimiter(seed_budgets=True)
    gate = Gate(limiter, 10, store=FailingTotals(), guard=DatabaseGuard(1.0), fail_open=fail_open)  # type: ignore[arg-type]
    caller = Caller(request_id="r", route="/v1/chat/completions", key_id="key_1")
    caller.limits = KeyLimits(rpm=1, daily_tokens=1000)
    route: ModelRoute = None  # type: ignore[assignment]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if not fail_open:
        with pytest.raises(ServiceUnavailable) as info:
            await gate(caller, route, body)
        assert info.value.code == "database_unavailable" and "Retry-After" in info.value.headers
        return
    admission = await gate(caller, route, body)  # admitted on its per-minute limit, its tokens counted
    assert admission is not None
    await admission.settle(7)
    from llm_backend.errors import RateLimited

    with pytest.raises(RateLimited):  # the rpm of 1 still holds while the budget cannot be checked
        await gate(caller, route, body)
    usage = await limiter.usage("key_1", KeyLimits(daily_tokens=1000))
    assert usage["daily_tokens"]["used"] == 7
