"""The console's admin-key sign-in is throttled per client address: after 5 failures within 15 minutes the
form answers 429 with Retry-After without looking at the key; a success clears the count. Over real HTTP
with the client address from X-Forwarded-For (TRUSTED_PROXIES), the throttle's clock moved by the test;
shared by workers through Redis, and in each worker's memory when Redis fails."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from llm_backend.app import create_app
from llm_backend.db.migrate import upgrade
from llm_backend.services import signin_throttle
from llm_backend.services.signin_throttle import SignInThrottle
from tests.conftest import closed_port_url, running_server
from tests.console.conftest import ADMIN_KEY, csrf_of
from tests.e2e_access.conftest import redis_or_skip

WRONG = "sk-llmb-not-the-admin-key-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(signin_throttle, "now", fake)
    return fake


@pytest.fixture
def serve(make_settings: Callable[..., Any], tmp_path: Path) -> Iterator[Callable[..., str]]:
    """serve(**settings) -> base URL of a console app (admin key, proxies on loopback trusted)."""
    url = f"sqlite:///{tmp_path}/console.db"
    upgrade(url)
    with contextlib.ExitStack() as stack:

        def start(**kw: Any) -> str:
            kw.setdefault("auth", "keys")
            kw.setdefault("admin_key", ADMIN_KEY)
            kw.setdefault("database_url", url)
            kw.setdefault("trusted_proxies", (ipaddress.ip_network("127.0.0.1/32"),))
            app = create_app(make_settings(None, **kw))
            return stack.enter_context(running_server(app, proxy_headers=False))

        yield start


def attempt(url: str, ip: str, key: str) -> httpx.Response:
    """The sign-in form, fetched and posted as a browser at `ip` would."""
    headers = {"X-Forwarded-For": ip}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        page = client.get("/console/login")
        assert page.status_code == 200, page.text
        form = {"csrf_token": csrf_of(page.text), "admin_key": key, "next": "/console/keys"}
        return client.post("/console/login", data=form)


def test_five_failures_block_the_address_for_fifteen_minutes(serve, clock: Clock, caplog) -> None:
    url = serve()
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            assert attempt(url, "203.0.113.7", WRONG).status_code == 401
            clock.now += 60
    refusals = [r for r in caplog.records if "console sign-in refused from" in r.getMessage()]
    assert len(refusals) == 5 and all("203.0.113.7" in r.getMessage() for r in refusals)
    assert not any(WRONG in r.getMessage() for r in caplog.records)
    # the right key now gets the same refusal: it is not looked at
    blocked = attempt(url, "203.0.113.7", ADMIN_KEY)
    assert blocked.status_code == 429
    assert blocked.headers["content-type"].startswith("text/html")
    assert blocked.headers["retry-after"] == "600"  # the first failure, 300 s ago, ages out then
    assert "Too many failed sign-ins" in blocked.text and "llmb_console=" not in blocked.headers.get(
        "set-cookie", ""
    )
    assert blocked.headers["x-frame-options"] == "DENY"  # the console's page headers
    # another address is not held back
    assert attempt(url, "203.0.113.8", ADMIN_KEY).status_code == 303
    clock.now += 599
    assert attempt(url, "203.0.113.7", ADMIN_KEY).headers["retry-after"] == "1"
    clock.now += 1  # the first failure has aged out: four in the window
    assert attempt(url, "203.0.113.7", ADMIN_KEY).status_code == 303


def test_a_success_clears_the_count(serve, clock: Clock) -> None:
    url = serve()
    for _ in range(4):
        assert attempt(url, "198.51.100.1", WRONG).status_code == 401
    assert attempt(url, "198.51.100.1", ADMIN_KEY).status_code == 303
    for _ in range(4):
        assert attempt(url, "198.51.100.1", WRONG).status_code == 401
    assert attempt(url, "198.51.100.1", ADMIN_KEY).status_code == 303
    for _ in range(5):
        assert attempt(url, "198.51.100.1", WRONG).status_code == 401
    assert attempt(url, "198.51.100.1", ADMIN_KEY).status_code == 429


def test_the_address_is_the_peers_unless_a_trusted_proxy_forwards(serve, clock: Clock) -> None:
    """Without TRUSTED_PROXIES, X-Forwarded-For is the client's own say: every attempt is the peer's."""
    url = serve(trusted_proxies=())
    for i in range(5):
        assert attempt(url, f"192.0.2.{i}", WRONG).status_code == 401
    assert attempt(url, "192.0.2.99", ADMIN_KEY).status_code == 429


@pytest.mark.redis
def test_workers_share_the_count_through_redis(serve, clock: Clock) -> None:
    redis_url = redis_or_skip()
    ip = f"2001:db8::{secrets.randbelow(0xFFFF):x}"
    store = redis.Redis.from_url(redis_url)
    try:
        one, two = serve(redis_url=redis_url), serve(redis_url=redis_url)
        for i in range(5):
            assert attempt(one if i % 2 else two, ip, WRONG).status_code == 401
        assert attempt(one, ip, ADMIN_KEY).status_code == 429
        assert attempt(two, ip, ADMIN_KEY).status_code == 429
        assert store.exists(f"llmb:signin:{ip}")
        clock.now += 901
        assert attempt(two, ip, ADMIN_KEY).status_code == 303
        assert not store.exists(f"llmb:signin:{ip}")  # the success cleared it for both
    finally:
        store.delete(f"llmb:signin:{ip}")
        store.close()


def test_without_redis_each_worker_counts_in_memory(serve, clock: Clock) -> None:
    url = serve(redis_url=closed_port_url().replace("http://", "redis://"))
    for _ in range(5):
        assert attempt(url, "203.0.113.50", WRONG).status_code == 401
    assert attempt(url, "203.0.113.50", ADMIN_KEY).status_code == 429


async def test_memory_holds_a_bounded_number_of_addresses() -> None:
    now = [0.0]
    throttle = SignInThrottle(max_failures=2, max_addresses=3, clock=lambda: now[0])
    for ip in ("a", "b", "c"):
        await throttle.failed(ip)
    await throttle.failed("a")  # "a" failed last: "b" is now the oldest
    assert await throttle.retry_after("a") == 900
    await throttle.failed("d")
    assert set(throttle._failures) == {"a", "c", "d"}
    assert await throttle.retry_after("a") == 900  # the busiest address was kept
    for _ in range(10):
        await throttle.failed("e")
    assert len(throttle._failures) == 3 and len(throttle._failures["e"]) == 2
