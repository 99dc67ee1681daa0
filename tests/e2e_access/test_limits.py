"""Limits end to end, on the in-process limiter and on Redis: RPM under a burst, TPM, parallel slots,
daily budgets under concurrent streams, the x-ratelimit-* headers, Retry-After and window resets."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import BackendConfig, ModelConfig
from llm_backend.limits import estimate_tokens
from llm_backend.limits.base import seconds_to_next_day, seconds_to_next_month
from llm_backend.services import access
from tests.e2e_access.conftest import (
    MESSAGES,
    MODELS,
    assert_openai_error,
    bearer,
    ceil_s,
    chat,
    closed_port_url,
    create_key,
    mock_model,
    rate_headers,
    retry_after,
    table_rows,
)

CHAT = "/v1/chat/completions"


def async_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=300, max_keepalive_connections=300)
    )


def reservation(body: dict[str, Any]) -> int:
    """What the gate reserves for this body (the app's default max tokens is 1024)."""
    return estimate_tokens(body, default_completion_tokens=1024)


# -- a gated upstream: admitted requests wait there until the test lets them go ---------------------------


class GatedUpstream:
    """An OpenAI-compatible upstream whose answers wait for `release`: admitted requests stay in flight."""

    USAGE = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.release = threading.Event()
        self.arrived = 0
        self._lock = threading.Lock()
        server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(self._handle)

    def _handle(self, request: Request) -> Response:
        with self._lock:
            self.arrived += 1
        self.release.wait(30)
        body = {
            "id": "chatcmpl-gated",
            "object": "chat.completion",
            "created": 1739000000,
            "model": "gated",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "usage": self.USAGE,
        }
        return Response(orjson.dumps(body), content_type="application/json")

    def model(self) -> ModelConfig:
        backend = BackendConfig(
            provider="openai", name="gated", base_url=self.server.url_for("/v1"), api_key="upstream-key"
        )
        return ModelConfig(name="gated", backends=(backend,), retries=0)


@pytest.fixture
def gated() -> Iterator[GatedUpstream]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    upstream = GatedUpstream(server)
    try:
        yield upstream
    finally:
        upstream.release.set()
        server.clear()
        server.stop()


async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# -- a clock for the limiter ------------------------------------------------------------------------------


class LimiterClock:
    """Makes the app's limiter see time moved forward: the in-process one through its clock, the Redis one
    through its time offset (a test hook of RedisLimiter). Windows pass without sleeping.

    The in-process limiter's clock also stands still between `advance` calls, so its buckets drain only when
    the test says so, however slow the machine. Redis keeps its own TIME: `drift()` bounds how far it may
    have moved on by itself since the test began (0 for the in-process limiter)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.frozen: float | None = time.time()
        self.started = time.monotonic()
        self.limiters: list[Any] = []

    def now(self) -> float:
        return (time.time() if self.frozen is None else self.frozen) + self.offset

    def drift(self) -> float:
        return 0.0 if self.frozen is not None else time.monotonic() - self.started

    def mark(self) -> None:
        """Count drift from now on (call it right before the requests whose bounds use it)."""
        self.started = time.monotonic()

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        for limiter in self.limiters:
            if hasattr(limiter, "time_offset_s"):
                limiter.time_offset_s = self.offset


@pytest.fixture
def limiter_clock(monkeypatch: pytest.MonkeyPatch) -> LimiterClock:
    clock = LimiterClock()
    real = access.make_limiter

    def make_limiter(redis_url: str | None, *, fail_open: bool, **options: Any) -> Any:
        if redis_url:
            clock.frozen = None  # Redis TIME runs on
        else:
            options["clock"] = clock.now
        limiter = real(redis_url, fail_open=fail_open, **options)
        clock.limiters.append(limiter)
        return limiter

    monkeypatch.setattr(access, "make_limiter", make_limiter)
    return clock


# -- RPM --------------------------------------------------------------------------------------------------


async def test_200_concurrent_requests_on_rpm_10_exactly_10_succeed(
    serve, http, limiter_redis_url, limiter_clock
):
    url = serve(redis_url=limiter_redis_url)
    key = create_key(http(url), rpm=10)["key"]
    async with async_client(url) as c:
        limiter_clock.mark()
        answers = await asyncio.gather(*(c.post(CHAT, json=chat(), headers=bearer(key)) for _ in range(200)))
    # one request drains from the bucket every 6 s: on Redis's running clock a burst that takes longer here
    # may let that many more through (on the in-process limiter's still clock: none)
    extra = math.floor(limiter_clock.drift() / 6)
    ok = [r for r in answers if r.status_code == 200]
    limited = [r for r in answers if r.status_code == 429]
    assert 10 <= len(ok) <= 10 + extra and len(ok) + len(limited) == 200, sorted(
        {r.status_code for r in answers}
    )
    remaining = sorted(rate_headers(r, "requests")[1] for r in ok)
    if extra == 0:
        assert remaining == list(range(10))
    else:
        assert set(remaining) == set(range(10)), remaining
    for r in limited:
        assert_openai_error(r, 429, code="rate_limit_exceeded", type_="rate_limit_error")
        limit, remaining, reset = rate_headers(r, "requests")
        assert (limit, remaining) == (10, 0)
        # the bucket is full: the next request fits in 60/10 s, the bucket is empty in at most 60 s
        assert 1 <= retry_after(r) <= 6 and reset <= 60
        assert retry_after(r) <= ceil_s(reset)


async def test_async_openai_sdk_gets_rate_limit_errors(serve, http, limiter_redis_url, limiter_clock):
    url = serve(redis_url=limiter_redis_url)
    key = create_key(http(url), rpm=5)["key"]
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    limiter_clock.mark()
    try:
        results = await asyncio.gather(
            *(client.chat.completions.create(model="m", messages=MESSAGES) for _ in range(30)),
            return_exceptions=True,
        )
    finally:
        await client.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    extra = math.floor(limiter_clock.drift() / 12)  # a request drains every 12 s (none on a still clock)
    assert 5 <= len(results) - len(errors) <= 5 + extra
    assert all(isinstance(e, openai.RateLimitError) for e in errors), {type(e) for e in errors}
    assert {e.code for e in errors} == {"rate_limit_exceeded"}
    assert all(e.response.headers["retry-after"].isdigit() for e in errors)


# -- TPM and parallel slots -------------------------------------------------------------------------------


async def test_tpm_reserves_tokens_of_requests_in_flight(
    serve, http, limiter_redis_url, gated, limiter_clock
):
    body = chat("gated", max_tokens=100)
    reserve = reservation(body)
    tpm = 3 * reserve + reserve // 2  # room for three reservations in flight, not four
    url = serve(models=(*MODELS, gated.model()), redis_url=limiter_redis_url)
    key = create_key(http(url), tpm=tpm)["key"]
    async with async_client(url) as c:
        tasks = [asyncio.create_task(c.post(CHAT, json=body, headers=bearer(key))) for _ in range(12)]
        await wait_until(lambda: gated.arrived == 3 and sum(t.done() for t in tasks) == 9)
        refused = [t.result() for t in tasks if t.done()]
        gated.release.set()
        answers = await asyncio.gather(*tasks)
        assert gated.arrived == 3  # the refused ones never reached the upstream
        for r in refused:
            error = assert_openai_error(r, 429, code="rate_limit_exceeded", type_="rate_limit_error")
            assert "tokens per minute" in error["message"]
            limit, remaining, reset = rate_headers(r, "tokens")
            assert limit == tpm and remaining < reserve and reset > 0
            # 3.5 reservations fit, 4 are needed: half a reservation must drain (60 s for the whole tpm)
            expected = (4 * reserve - tpm) * 60 / tpm
            assert ceil_s(expected - limiter_clock.drift()) - 1 <= retry_after(r) <= ceil_s(expected)
        assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 9

        # settled with the real usage (20 tokens each): the reservations are refunded, room again
        after = await c.post(CHAT, json=body, headers=bearer(key))
        assert after.status_code == 200, after.text
        limit, remaining, _ = rate_headers(after, "tokens")
        drained = limiter_clock.drift() * tpm / 60  # what refilled meanwhile (nothing on a still clock)
        assert remaining <= tpm - 3 * GatedUpstream.USAGE["total_tokens"] - reserve + drained
        assert remaining >= tpm - 3 * GatedUpstream.USAGE["total_tokens"] - reserve - 2


async def test_max_parallel_counts_requests_in_flight(serve, http, limiter_redis_url, gated):
    url = serve(models=(*MODELS, gated.model()), redis_url=limiter_redis_url)
    key = create_key(http(url), max_parallel=3)["key"]
    body = chat("gated", max_tokens=10)
    async with async_client(url) as c:
        tasks = [asyncio.create_task(c.post(CHAT, json=body, headers=bearer(key))) for _ in range(10)]
        await wait_until(lambda: gated.arrived == 3 and sum(t.done() for t in tasks) == 7)
        for t in tasks:
            if t.done():
                error = assert_openai_error(t.result(), 429, code="rate_limit_exceeded")
                assert "parallel" in error["message"]
                assert retry_after(t.result()) == 1
        gated.release.set()
        answers = await asyncio.gather(*tasks)
        assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 7
        # the slots are free again once the answers are out
        again = await asyncio.gather(*(c.post(CHAT, json=body, headers=bearer(key)) for _ in range(3)))
        assert [r.status_code for r in again] == [200] * 3


async def test_parallel_slot_of_a_stream_is_held_until_it_ends(serve, http, limiter_redis_url):
    url = serve(models=(mock_model("slow", delay_ms=40),), redis_url=limiter_redis_url)
    key = create_key(http(url), max_parallel=1)["key"]
    async with async_client(url) as c:
        async with c.stream("POST", CHAT, json=chat("slow", stream=True), headers=bearer(key)) as first:
            assert first.status_code == 200
            busy = await c.post(CHAT, json=chat("slow"), headers=bearer(key))
            assert_openai_error(busy, 429, code="rate_limit_exceeded")
            body = b"".join([part async for part in first.aiter_bytes()])
        assert body.rstrip().endswith(b"data: [DONE]")
        # the server frees the slot as the stream's last bytes go out: wait for that, however slow it is here
        deadline = time.monotonic() + 30
        while True:
            free = await c.post(CHAT, json=chat("slow"), headers=bearer(key))
            if free.status_code != 429 or time.monotonic() > deadline:
                break
            assert_openai_error(free, 429, code="rate_limit_exceeded")
            await asyncio.sleep(0.05)
        assert free.status_code == 200, free.text


# -- budgets ----------------------------------------------------------------------------------------------


async def test_concurrent_streams_never_overshoot_the_daily_budget(
    serve, http, limiter_redis_url, sqlite_url
):
    budget = 1000
    body = chat("slow", max_tokens=200, stream=True)
    reserve = reservation(body)
    url = serve(models=(mock_model("slow", delay_ms=3),), redis_url=limiter_redis_url, recording=True)
    info = create_key(http(url), daily_tokens=budget)
    key = info["key"]
    successes = 0
    last_refusal = None
    async with async_client(url) as c:

        async def one() -> tuple[int, bytes, httpx.Response]:
            async with c.stream("POST", CHAT, json=body, headers=bearer(key)) as r:
                return r.status_code, await r.aread(), r

        for _ in range(40):
            wave = await asyncio.gather(*(one() for _ in range(8)))
            for status, raw, r in wave:
                if status == 200:
                    assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
                    successes += 1
                else:
                    assert status == 429, raw
                    error = orjson.loads(raw)["error"]
                    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota"), (
                        error
                    )
                    last_refusal = r
            if all(status == 429 for status, _, _ in wave):
                break
        else:
            pytest.fail("the daily budget was never used up")
    assert successes >= 2 and last_refusal is not None
    # the budget resets at the next UTC midnight
    assert abs(int(last_refusal.headers["retry-after"]) - ceil_s(seconds_to_next_day(time.time()))) <= 3
    serve.stop(url)  # drain the recorder

    rows = [r for r in table_rows(sqlite_url, "request_log") if r["key_id"] == info["id"]]
    used = sum(r["total_tokens"] for r in rows if r["status_code"] == 200)
    assert sum(r["status_code"] == 200 for r in rows) == successes
    assert used <= budget + reserve, (used, budget, reserve)
    # and the budget really was (nearly) spent before requests were refused
    assert used > budget - reserve, (used, budget, reserve)


@pytest.mark.parametrize(
    ("field", "until_reset"),
    [("daily_tokens", seconds_to_next_day), ("monthly_tokens", seconds_to_next_month)],
)
async def test_budget_spent_is_insufficient_quota_until_the_period_ends(
    serve, http, limiter_redis_url, limiter_clock, field, until_reset
):
    url = serve(redis_url=limiter_redis_url)
    c = http(url)
    body = chat(max_tokens=50)
    key = create_key(c, **{field: reservation(body) + 5})["key"]
    first = c.post(CHAT, json=body, headers=bearer(key))
    assert first.status_code == 200
    assert first.json()["usage"]["total_tokens"] > 5  # so a second reservation no longer fits
    spent = c.post(CHAT, json=body, headers=bearer(key))
    assert_openai_error(spent, 429, code="insufficient_quota", type_="insufficient_quota")
    wait = until_reset(limiter_clock.now())
    assert abs(retry_after(spent) - ceil_s(wait)) <= 3
    # a request that would fit the rest of the budget still goes through
    small = c.post(CHAT, json=chat(max_tokens=1), headers=bearer(key))
    assert small.status_code == 200, small.text
    limiter_clock.advance(wait + 1)
    assert c.post(CHAT, json=body, headers=bearer(key)).status_code == 200


# -- headers and windows ----------------------------------------------------------------------------------


def test_rate_limit_headers_on_answers_streams_and_429s(serve, http, limiter_redis_url, limiter_clock):
    url = serve(redis_url=limiter_redis_url)
    c = http(url)
    rpm, tpm = 4, 10_000
    key = create_key(c, rpm=rpm, tpm=tpm)["key"]
    body = chat(max_tokens=50)
    reserve = reservation(body)
    settled = 0
    limiter_clock.mark()
    for i in range(1, rpm + 1):
        stream = i == rpm
        r = c.post(CHAT, json={**body, "stream": stream}, headers=bearer(key))
        # what the buckets may have drained by themselves by now (nothing on the in-process limiter's clock)
        drift = limiter_clock.drift()
        assert drift < 60 / rpm, f"the requests took {drift:.1f}s: a whole request drained, bounds below fail"
        assert r.status_code == 200, r.text
        assert rate_headers(r, "requests")[:2] == (rpm, rpm - i)
        reset_requests = rate_headers(r, "requests")[2]
        assert i * 60 / rpm - 2 - drift <= reset_requests <= i * 60 / rpm  # the bucket drains as time passes
        limit, remaining, reset_tokens = rate_headers(r, "tokens")
        assert limit == tpm
        level = settled + reserve  # earlier requests settled to their usage, this one still reserved
        assert tpm - level <= remaining <= tpm - level + 2 + drift * tpm / 60
        assert level * 60 / tpm - 2 - drift <= reset_tokens <= level * 60 / tpm + 0.001  # the header has ms
        if stream:
            assert r.headers["content-type"].startswith("text/event-stream")
        else:
            settled += r.json()["usage"]["total_tokens"]
    refused = c.post(CHAT, json=body, headers=bearer(key))
    drift = limiter_clock.drift()
    assert_openai_error(refused, 429, code="rate_limit_exceeded")
    assert rate_headers(refused, "requests")[:2] == (rpm, 0)
    assert rate_headers(refused, "tokens")[0] == tpm
    # full bucket of 4: one request drains in 60/4 = 15 s, the whole bucket in 60 s
    reset = rate_headers(refused, "requests")[2]
    assert 58 - drift <= reset <= 60
    assert ceil_s(14 - drift) <= retry_after(refused) <= 15
    assert retry_after(refused) == ceil_s(reset - (rpm - 1) * 60 / rpm)


def test_rpm_window_resets(serve, http, limiter_redis_url, limiter_clock):
    url = serve(redis_url=limiter_redis_url)
    c = http(url)
    key = create_key(c, rpm=2)["key"]
    assert [c.post(CHAT, json=chat(), headers=bearer(key)).status_code for _ in range(2)] == [200, 200]
    refused = c.post(CHAT, json=chat(), headers=bearer(key))
    assert_openai_error(refused, 429, code="rate_limit_exceeded")
    wait = retry_after(refused)
    assert ceil_s(30 - limiter_clock.drift()) <= wait <= 30  # 60 s / 2 requests (exactly 30 on a still clock)
    # just before the wait is over the key is still refused; Redis's own clock runs on meanwhile, so there
    # the test stops further before the end
    margin = 1.5 if limiter_redis_url is None else 10.0
    limiter_clock.advance(wait - margin)
    early = c.post(CHAT, json=chat(), headers=bearer(key))
    assert_openai_error(early, 429, code="rate_limit_exceeded")
    assert ceil_s(margin - 1 - limiter_clock.drift()) <= retry_after(early) <= math.ceil(margin)
    limiter_clock.advance(margin + 0.5)
    again = c.post(CHAT, json=chat(), headers=bearer(key))
    assert again.status_code == 200, again.text
    assert rate_headers(again, "requests")[1] == 0
    limiter_clock.advance(61)  # a full window: the bucket is empty again
    fresh = c.post(CHAT, json=chat(), headers=bearer(key))
    assert fresh.status_code == 200
    limit, remaining, reset = rate_headers(fresh, "requests")
    assert (limit, remaining) == (2, 1) and 29 - limiter_clock.drift() <= reset <= 30
    assert c.post(CHAT, json=chat(), headers=bearer(key)).status_code == 200
    assert c.post(CHAT, json=chat(), headers=bearer(key)).status_code == 429


def test_limits_follow_admin_changes(serve, http, limiter_redis_url):
    url = serve(redis_url=limiter_redis_url)
    c = http(url)
    info = create_key(c, rpm=1)
    key = info["key"]
    assert c.post(CHAT, json=chat(), headers=bearer(key)).status_code == 200
    assert c.post(CHAT, json=chat(), headers=bearer(key)).status_code == 429
    r = c.patch(f"/admin/keys/{info['id']}", json={"rpm": 3}, headers={"Authorization": "Bearer adm-secret"})
    assert r.status_code == 200
    assert [c.post(CHAT, json=chat(), headers=bearer(key)).status_code for _ in range(3)] == [200, 200, 429]


def test_keys_do_not_share_limits(serve, http, limiter_redis_url):
    url = serve(redis_url=limiter_redis_url)
    c = http(url)
    a, b = create_key(c, "a", rpm=1)["key"], create_key(c, "b", rpm=1)["key"]
    assert c.post(CHAT, json=chat(), headers=bearer(a)).status_code == 200
    assert c.post(CHAT, json=chat(), headers=bearer(a)).status_code == 429
    assert c.post(CHAT, json=chat(), headers=bearer(b)).status_code == 200


def test_warning_when_several_workers_run_without_redis(serve, caplog):
    caplog.set_level(logging.INFO)
    serve(web_concurrency=2)
    assert any(
        r.levelno == logging.WARNING and "REDIS_URL" in r.getMessage() and "per worker" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_one_limit_across_every_route(serve, http, limiter_redis_url):
    url = serve(redis_url=limiter_redis_url)
    c = http(url)
    key = create_key(c, rpm=4)["key"]
    calls = [
        (CHAT, chat()),
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 5}),
        ("/v1/embeddings", {"model": "m", "input": "hi"}),
        ("/openai/deployments/m/chat/completions?api-version=2024-10-21", {"messages": MESSAGES}),
    ]
    for path, body in calls:
        r = c.post(path, json=body, headers={"api-key": key})
        assert r.status_code == 200, (path, r.text)
        assert "x-ratelimit-remaining-requests" in r.headers, path
    for path, body in calls:
        assert_openai_error(c.post(path, json=body, headers=bearer(key)), 429, code="rate_limit_exceeded")


def test_embeddings_reserve_no_completion_tokens(serve, http, limiter_redis_url):
    url = serve(redis_url=limiter_redis_url)
    c = http(url)
    key = create_key(c, daily_tokens=1000)["key"]
    statuses = [
        c.post("/v1/embeddings", json={"model": "m", "input": "hello"}, headers=bearer(key)).status_code
        for _ in range(5)
    ]
    assert statuses == [200] * 5  # 5 x 2 tokens of a 1000-token budget


async def test_parallel_slot_and_tokens_come_back_after_failures_and_disconnects(
    serve, http, limiter_redis_url
):
    dead = ModelConfig(
        name="dead",
        backends=(
            BackendConfig(provider="openai", name="dead", base_url=f"{closed_port_url()}/v1", api_key="k"),
        ),
        retries=0,
    )
    url = serve(models=(mock_model("slow", delay_ms=40), dead), redis_url=limiter_redis_url)
    c = http(url)
    body = chat("slow", max_tokens=100)
    budget = 3 * reservation(body)
    key = create_key(c, max_parallel=1, daily_tokens=budget)["key"]
    # an unreachable upstream (JSON and stream): 502/503, and the reservation is given back
    for stream in (False, True) * 3:
        r = c.post(CHAT, json={**chat("dead", max_tokens=100), "stream": stream}, headers=bearer(key))
        assert_openai_error(r, r.status_code)
        assert r.status_code in (502, 503)  # 503 once the backend's circuit breaker is open
    assert c.post(CHAT, json=body, headers=bearer(key)).status_code == 200
    # a client that goes away mid-stream frees its slot (settled with what was streamed)
    async with async_client(url) as ac:
        async with ac.stream("POST", CHAT, json={**body, "stream": True}, headers=bearer(key)) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = c.post(CHAT, json=body, headers=bearer(key))
        if r.status_code == 200:
            break
        assert_openai_error(r, 429, code="rate_limit_exceeded")  # the slot is still being released
        await asyncio.sleep(0.05)
    assert r.status_code == 200, r.text
