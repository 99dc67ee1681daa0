"""Strategies spread load as configured (statistical checks with tolerances); max_parallel is respected."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.app import create_app
from llm_backend.upstream.errors import NoBackendAvailable
from tests.conftest import assert_openai_error, azure_chat_completion, running_server
from tests.routing.conftest import (
    CHAT_PATH,
    MESSAGES,
    answer,
    chat,
    content,
    fake,
    hits,
    make_router,
    model,
    region,
    reset,
)

# -- through the app -------------------------------------------------------------------------------------


def test_weighted_3_to_1_shares_the_load(open_client, east: HTTPServer, west: HTTPServer) -> None:
    answer(east, "east")
    answer(west, "west")
    c = open_client(
        model(region(east, "eastus", weight=3), region(west, "westus", weight=1), strategy="weighted")
    )
    n = 400
    served = collections.Counter(content(chat(c)) for _ in range(n))
    assert served["east"] + served["west"] == n
    assert 0.65 <= served["east"] / n <= 0.85, served
    assert (hits(east), hits(west)) == (served["east"], served["west"])


def test_equal_priorities_share_the_load_by_weight(open_client, east: HTTPServer, west: HTTPServer) -> None:
    answer(east, "east")
    answer(west, "west")
    c = open_client(model(region(east, "eastus", priority=5), region(west, "westus", priority=5)))
    n = 200
    served = collections.Counter(content(chat(c)) for _ in range(n))
    assert 0.35 <= served["east"] / n <= 0.65, served


def test_priority_sends_everything_to_the_lowest_number(
    open_client, east: HTTPServer, west: HTTPServer
) -> None:
    answer(east, "east")
    answer(west, "west")
    c = open_client(
        model(region(east, "eastus", priority=1, weight=1), region(west, "westus", priority=0, weight=0.1))
    )
    assert {content(chat(c)) for _ in range(20)} == {"west"}
    assert hits(east) == 0


def _held_until(server: HTTPServer, text: str, arrivals: list[str], done: threading.Event) -> None:
    """The region answers `text` once `done` is set (a minute at most), noting each arrival first."""
    reset(server)

    def handler(request: Request) -> Response:
        arrivals.append(text)
        done.wait(60)
        return Response(orjson.dumps(azure_chat_completion(text)), content_type="application/json")

    server.expect_request(CHAT_PATH, method="POST").respond_with_handler(handler)


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_least_busy_spreads_concurrent_slow_requests(settings, east: HTTPServer, west: HTTPServer) -> None:
    n = 8
    arrivals: list[str] = []
    everyone_in = threading.Event()
    # no answer comes back before all 8 requests are in flight, however slowly they are sent
    _held_until(east, "east", arrivals, everyone_in)
    _held_until(west, "west", arrivals, everyone_in)
    # east is preferred by priority; least_busy must ignore that while east is busier
    cfg = model(region(east, "eastus", priority=0), region(west, "westus", priority=1), strategy="least_busy")
    with running_server(create_app(settings(cfg))) as url, ThreadPoolExecutor(n) as pool:
        with httpx.Client(base_url=url, timeout=90) as http:
            body = {"model": "gpt-4o", "messages": MESSAGES}
            futures = [pool.submit(http.post, "/v1/chat/completions", json=body) for _ in range(n)]
            try:
                _wait_for(lambda: len(arrivals) == n, f"{n} requests in flight")
            finally:
                everyone_in.set()
            responses = [f.result() for f in futures]
    served = collections.Counter(r.json()["choices"][0]["message"]["content"] for r in responses)
    assert all(r.status_code == 200 for r in responses)
    assert 3 <= served["east"] <= 5 and 3 <= served["west"] <= 5, served


def test_max_parallel_full_everywhere_gives_503(settings, laggard: HTTPServer, west: HTTPServer) -> None:
    arrivals: list[str] = []
    release = threading.Event()
    _held_until(laggard, "east", arrivals, release)
    _held_until(west, "west", arrivals, release)
    cfg = model(region(laggard, "eastus", max_parallel=1), region(west, "westus", priority=1, max_parallel=1))
    body = {"model": "gpt-4o", "messages": MESSAGES}
    with running_server(create_app(settings(cfg))) as url, ThreadPoolExecutor(2) as pool:
        with httpx.Client(base_url=url, timeout=90) as http:
            held = [pool.submit(http.post, "/v1/chat/completions", json=body) for _ in range(2)]
            try:
                _wait_for(lambda: len(arrivals) == 2, "both regions to hold a request")
                # each region's only slot is taken: a third request has nowhere to go
                refused = http.post("/v1/chat/completions", json=body)
            finally:
                release.set()
            responses = [f.result() for f in held]
    assert_openai_error(refused, 503, code="no_backend_available")
    assert "parallel" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    served = sorted(r.json()["choices"][0]["message"]["content"] for r in responses)
    assert served == ["east", "west"]


# -- Router units --------------------------------------------------------------------------------------------


def _first_counts(cfg, n: int = 4000, **in_flight: int) -> collections.Counter[str]:
    router = make_router(cfg)
    route = router.resolve("gpt-4o")
    for name, count in in_flight.items():
        router.states[f"gpt-4o/{name}"].in_flight = count
    return collections.Counter(router.plan(route)[0].name for _ in range(n))


def test_router_weighted_order_is_proportional() -> None:
    counts = _first_counts(model(fake("a", weight=3), fake("b", weight=1), strategy="weighted"))
    assert 0.72 <= counts["a"] / 4000 <= 0.78, counts


def test_router_priority_groups_then_weights() -> None:
    cfg = model(
        fake("a", priority=0, weight=1), fake("b", priority=0, weight=3), fake("c", priority=1, weight=100)
    )
    counts = _first_counts(cfg)
    assert counts["c"] == 0
    assert 0.72 <= counts["b"] / 4000 <= 0.78, counts
    router = make_router(cfg)
    assert all(router.plan(router.resolve("gpt-4o"))[-1].name == "c" for _ in range(100))


def test_router_zero_weight_is_only_a_fallback() -> None:
    counts = _first_counts(model(fake("a", weight=0), fake("b", weight=1), strategy="weighted"), n=500)
    assert counts == {"b": 500}


def test_router_least_busy_picks_the_fewest_in_flight() -> None:
    cfg = model(fake("a"), fake("b"), fake("c"), strategy="least_busy")
    assert _first_counts(cfg, n=200, a=3, b=1, c=2) == {"b": 200}
    router = make_router(cfg)
    for name, k in (("a", 3), ("b", 1), ("c", 2)):
        router.states[f"gpt-4o/{name}"].in_flight = k
    assert [s.name for s in router.plan(router.resolve("gpt-4o"))] == ["b", "c", "a"]
    # ties are shared
    tied = _first_counts(cfg, n=900, a=1, b=1, c=1)
    assert all(250 <= tied[x] <= 350 for x in "abc"), tied


def test_router_lowest_latency_prefers_the_fastest_average() -> None:
    cfg = model(fake("a"), fake("b"), fake("c"), strategy="lowest_latency")
    router = make_router(cfg)
    route = router.resolve("gpt-4o")
    a, b, c = (router.states[f"gpt-4o/{x}"] for x in "abc")
    a.latency_ewma_ms, b.latency_ewma_ms, c.latency_ewma_ms = 300.0, 80.0, 150.0
    assert [s.name for s in router.plan(route)] == ["b", "c", "a"]
    # the average moves with what is measured
    for _ in range(20):
        assert router.acquire(b)
        router.succeeded(b, 900.0)
    assert b.latency_ewma_ms is not None and b.latency_ewma_ms > 300
    assert [s.name for s in router.plan(route)] == ["c", "a", "b"]


def test_router_lowest_latency_tries_an_unmeasured_backend() -> None:
    router = make_router(model(fake("a"), fake("new"), strategy="lowest_latency"))
    router.states["gpt-4o/a"].latency_ewma_ms = 50.0
    assert router.plan(router.resolve("gpt-4o"))[0].name == "new"


def test_router_max_parallel() -> None:
    router = make_router(model(fake("a", max_parallel=2), fake("b", priority=1, max_parallel=1)))
    route = router.resolve("gpt-4o")
    a, b = router.states["gpt-4o/a"], router.states["gpt-4o/b"]
    assert router.acquire(a) and router.acquire(a)
    assert not router.acquire(a), "a third request on a max_parallel=2 backend"
    assert a.in_flight == 2
    assert router.plan(route) == [b]
    assert router.acquire(b)
    with pytest.raises(NoBackendAvailable) as info:
        router.plan(route)
    assert "parallel" in info.value.message
    assert info.value.retry_after == 1.0
    assert info.value.status_code == 503
    router.release(a)
    assert router.plan(route) == [a]
    router.succeeded(b, 10.0)
    assert b.in_flight == 0 and router.plan(route) == [a, b]
