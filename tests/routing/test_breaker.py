"""Circuit breaking per backend: opening, the half-open probe, /admin/backends, and every backend down."""

from __future__ import annotations

import asyncio
import itertools

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import BreakerConfig
from llm_backend.services.proxy import Caller, ProxyService
from llm_backend.upstream.base import CHAT
from llm_backend.upstream.errors import (
    NoBackendAvailable,
    UpstreamClientError,
    UpstreamRateLimited,
    UpstreamServerError,
)
from llm_backend.upstream.router import CLOSED, HALF_OPEN, OPEN, ModelRoute
from tests.conftest import assert_openai_error, azure_chat_completion
from tests.routing.conftest import (
    ADMIN,
    CHAT_PATH,
    FakeBackend,
    RouterClock,
    answer,
    backends,
    chat,
    content,
    fail,
    fake,
    hits,
    make_router,
    model,
    quick_breaker,
    region,
)


def two_regions(east: HTTPServer, west: HTTPServer, **kw) -> object:
    kw.setdefault("breaker", quick_breaker())
    return model(region(east, "eastus", priority=0), region(west, "westus", priority=1), **kw)


def open_east(c, east: HTTPServer, west: HTTPServer) -> None:
    """Three 500s from east (each request served by west): east's breaker opens."""
    fail(east, 500)
    answer(west, "west")
    for i in range(3):
        assert content(chat(c)) == "west"
        state = backends(c)["eastus"]["state"]
        assert state == ("open" if i == 2 else "closed"), (i, state)
    assert (hits(east), hits(west)) == (3, 3)


# -- through the app ----------------------------------------------------------------------------------------


def test_500s_open_the_breaker_and_a_successful_probe_closes_it(
    open_client, router_clock, east: HTTPServer, west: HTTPServer
) -> None:
    c = open_client(two_regions(east, west))
    open_east(c, east, west)

    state = backends(c)["eastus"]
    assert state["failures"] == 3 and state["consecutive_failures"] == 3
    assert 0 < state["open_remaining_s"] <= 1.0
    assert "500" in state["last_error"] and state["last_error_at"]
    assert backends(c)["westus"]["state"] == "closed"

    # open: requests go to west only
    assert content(chat(c)) == "west"
    assert (hits(east), hits(west)) == (3, 4)

    # after the cool-down the next request probes east; it succeeds and closes the breaker
    answer(east, "east")
    router_clock.advance(1.1)
    assert backends(c)["eastus"]["state"].startswith("half_open")
    assert content(chat(c)) == "east"
    assert (hits(east), hits(west)) == (4, 4)
    state = backends(c)["eastus"]
    assert state["state"] == "closed" and state["consecutive_failures"] == 0
    assert content(chat(c)) == "east"


def test_a_failed_probe_reopens_the_breaker(
    open_client, router_clock, east: HTTPServer, west: HTTPServer
) -> None:
    c = open_client(two_regions(east, west))
    open_east(c, east, west)
    router_clock.advance(1.1)

    # the probe fails: west serves, east is open again for a whole cool-down
    assert content(chat(c)) == "west"
    assert (hits(east), hits(west)) == (4, 4)
    state = backends(c)["eastus"]
    assert state["state"] == "open"
    assert state["open_remaining_s"] > 0.7
    assert content(chat(c)) == "west"
    assert hits(east) == 4, "a reopened breaker lets nothing through"


def test_failure_rate_over_the_window_opens_the_breaker(
    open_client, router_clock, east: HTTPServer, west: HTTPServer
) -> None:
    statuses = itertools.cycle([200, 500])

    def alternating(request: Request) -> Response:
        status = next(statuses)
        body = azure_chat_completion("east") if status == 200 else {"error": {"message": "boom"}}
        return Response(orjson.dumps(body), status=status, content_type="application/json")

    east.expect_request(CHAT_PATH, method="POST").respond_with_handler(alternating)
    answer(west, "west")
    breaker = BreakerConfig(failure_threshold=100, cooldown=30, failure_rate=0.5, window=60, min_requests=4)
    c = open_client(two_regions(east, west, breaker=breaker))
    served = [content(chat(c)) for _ in range(4)]
    assert served == ["east", "west", "east", "west"]
    state = backends(c)["eastus"]
    assert state["state"] == "open", "2 failures out of 4 is a rate of 0.5"
    assert state["consecutive_failures"] == 1
    assert content(chat(c)) == "west"
    assert hits(east) == 4


def test_admin_backends_needs_the_admin_key(open_client, east: HTTPServer, west: HTTPServer) -> None:
    c = open_client(two_regions(east, west))
    assert_openai_error(c.get("/admin/backends"), 401)
    assert_openai_error(c.get("/admin/backends", headers={"Authorization": "Bearer nope"}), 401)
    r = c.get("/admin/backends", headers=ADMIN)
    assert r.status_code == 200
    rows = r.json()["data"]
    assert [row["backend"] for row in rows] == ["eastus", "westus"]
    row = rows[0]
    assert row["model"] == "gpt-4o" and row["provider"] == "azure" and row["auth"] == "api_key"
    for key in (
        "state",
        "open_remaining_s",
        "cooldown_remaining_s",
        "in_flight",
        "latency_ewma_ms",
        "last_error",
        "successes",
        "failures",
    ):
        assert key in row
    assert "key-eastus" not in r.text, "the admin view never shows the backend's key"


# -- every backend down --------------------------------------------------------------------------------------


def test_all_breakers_open_gives_503_with_retry_after(
    open_client, router_clock, east: HTTPServer, west: HTTPServer
) -> None:
    fail(east, 500)
    fail(west, 500)
    c = open_client(two_regions(east, west, breaker=quick_breaker(failure_threshold=1, cooldown=3)))
    assert_openai_error(chat(c), 502)
    assert {row["state"] for row in backends(c).values()} == {"open"}

    r = chat(c)
    error = assert_openai_error(r, 503, code="no_backend_available", type_="service_unavailable")
    assert "gpt-4o" in error["message"]
    assert r.headers["retry-after"] in ("2", "3")
    assert (hits(east), hits(west)) == (1, 1), "nothing is sent while every breaker is open"


def test_all_cooling_after_429_gives_503_with_the_earliest_recovery(
    open_client, router_clock, east: HTTPServer, west: HTTPServer
) -> None:
    fail(east, 429, headers={"Retry-After": "2"})
    fail(west, 429, headers={"Retry-After": "20"})
    c = open_client(two_regions(east, west))
    first = chat(c)
    assert_openai_error(first, 429)

    r = chat(c)
    assert_openai_error(r, 503, code="no_backend_available")
    assert r.headers["retry-after"] in ("1", "2"), "the earliest recovery (east), not west's 20 s"
    assert (hits(east), hits(west)) == (1, 1)


def test_open_and_cooling_mixed_gives_503_with_the_earliest(
    open_client, router_clock, east: HTTPServer, west: HTTPServer
) -> None:
    fail(east, 500)
    fail(west, 429, headers={"Retry-After": "2"})
    c = open_client(two_regions(east, west, breaker=quick_breaker(failure_threshold=1, cooldown=30)))
    assert chat(c).status_code == 429
    r = chat(c)
    assert_openai_error(r, 503)
    assert r.headers["retry-after"] in ("1", "2")


# -- Router units --------------------------------------------------------------------------------------------


def _router(clock: RouterClock, **breaker_kw):
    cfg = model(fake("a"), fake("b", priority=1), breaker=quick_breaker(**breaker_kw))
    router = make_router(cfg, clock=clock)
    route = router.resolve("gpt-4o")
    assert route is not None
    return router, route, router.states["gpt-4o/a"], router.states["gpt-4o/b"]


def _fail(router, state, exc=None) -> None:
    assert router.acquire(state)
    router.failed(state, exc or UpstreamServerError("boom", upstream_status=500))


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = RouterClock()
    router, route, a, b = _router(clock, failure_threshold=1, cooldown=0.05)
    _fail(router, a)
    assert a.state == OPEN
    assert router.plan(route) == [b]
    clock.advance(0.06)
    assert router.plan(route) == [a, b]
    assert router.acquire(a)  # the probe
    assert a.state == HALF_OPEN
    assert router.plan(route) == [b], "while the probe is out, a takes nothing else"
    assert not router.acquire(a)
    router.succeeded(a, 12.0)
    assert a.state == CLOSED and a.in_flight == 0
    assert router.plan(route) == [a, b]


def test_caller_errors_do_not_count_and_close_a_half_open_breaker() -> None:
    clock = RouterClock()
    router, _, a, _ = _router(clock, failure_threshold=2, cooldown=0.05)
    for _ in range(5):
        _fail(router, a, UpstreamClientError("bad", status_code=400, body=None))
    assert a.state == CLOSED and a.failures == 0
    _fail(router, a)
    _fail(router, a)
    assert a.state == OPEN
    clock.advance(0.06)
    _fail(router, a, UpstreamClientError("bad", status_code=400, body=None))
    assert a.state == CLOSED, "a probe answered by the upstream (even a 400) shows the backend is up"


def test_a_429_on_the_probe_reopens_for_the_retry_after() -> None:
    clock = RouterClock()
    router, route, a, b = _router(clock, failure_threshold=1, cooldown=0.05)
    _fail(router, a)
    clock.advance(0.06)
    _fail(router, a, UpstreamRateLimited("quota", retry_after=5.0))
    assert a.state == OPEN
    with pytest.raises(NoBackendAvailable) as info:
        router.plan(ModelRoute(route.config, (a,)))
    assert 4 <= info.value.retry_after <= 5
    assert router.plan(route) == [b]


def test_429s_do_not_count_towards_the_breaker_threshold() -> None:
    clock = RouterClock()
    router, _, a, _ = _router(clock, failure_threshold=3, cooldown=30)
    for _ in range(2):
        _fail(router, a, UpstreamRateLimited("quota", retry_after=0.0))
    _fail(router, a)
    assert a.state == CLOSED, "only one real failure so far"


class _Hanging(FakeBackend):
    async def post(self, operation: str, body: bytes, *, model: str):  # type: ignore[override]
        await asyncio.sleep(3600)


async def test_a_cancelled_probe_does_not_lock_the_backend_out() -> None:
    import random

    from llm_backend.upstream.router import Router

    cfg = model(fake("a"), fake("b", priority=1), breaker=quick_breaker(failure_threshold=1, cooldown=0.05))
    clock = RouterClock()
    router = Router(
        [cfg],
        {"gpt-4o/a": _Hanging(cfg.backends[0]), "gpt-4o/b": _Hanging(cfg.backends[1])},
        rng=random.Random(1),
        clock=clock,
    )
    route = router.resolve("gpt-4o")
    a = router.states["gpt-4o/a"]
    _fail(router, a)
    clock.advance(0.06)

    proxy = ProxyService(router)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    task = asyncio.create_task(
        proxy.forward(CHAT, body, Caller(request_id="r1", route="/v1/chat/completions"))
    )
    for _ in range(6000):  # until the probe is out (no time is involved: at most a few loop turns)
        if a.in_flight:
            break
        await asyncio.sleep(0.005)
    assert a.state == HALF_OPEN and a.in_flight == 1  # the probe is out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.in_flight == 0
    clock.advance(0.1)  # longer than the cool-down
    assert a in router.plan(route), "the backend must get another probe"


def test_all_regions_429_tells_the_client_the_earliest_recovery(
    open_client, router_clock, east: HTTPServer, west: HTTPServer
) -> None:
    fail(east, 429, headers={"Retry-After": "2"})
    fail(west, 429, headers={"Retry-After": "20"})
    c = open_client(two_regions(east, west))
    r = chat(c)
    assert r.status_code in (429, 503)
    assert int(r.headers["retry-after"]) <= 2, r.headers["retry-after"]
