"""x-ratelimit-* headers: sent whenever a per-minute limit applies to the key (as the README says), on
answers and streams of every route style and on the 429s; never invented for keys without such a limit."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e_access.conftest import MESSAGES, assert_openai_error, bearer, chat, create_key, rate_headers

CALLS = [
    ("/v1/chat/completions", chat()),
    ("/v1/chat/completions", chat(stream=True)),
    ("/v1/embeddings", {"model": "m", "input": "hi"}),
    ("/openai/deployments/m/chat/completions?api-version=2024-10-21", {"messages": MESSAGES}),
]
NAMES = [f"x-ratelimit-{p}-{k}" for p in ("limit", "remaining", "reset") for k in ("requests", "tokens")]


def present(r: httpx.Response) -> set[str]:
    return {n for n in NAMES if n in r.headers}


@pytest.mark.parametrize(
    ("limits", "kinds"),
    [
        ({"rpm": 50}, {"requests"}),
        ({"tpm": 100_000}, {"tokens"}),
        ({"rpm": 50, "tpm": 100_000, "max_parallel": 4, "daily_tokens": 10**6}, {"requests", "tokens"}),
    ],
)
def test_headers_whenever_a_per_minute_limit_applies(serve, http, limiter_redis_url, limits, kinds) -> None:
    c = http(serve(redis_url=limiter_redis_url))
    key = create_key(c, **limits)["key"]
    for path, body in CALLS:
        r = c.post(path, json=body, headers=bearer(key))
        assert r.status_code == 200, (path, r.text)
        assert present(r) == {n for n in NAMES if n.rsplit("-", 1)[1] in kinds}, (path, dict(r.headers))
        for kind in kinds:
            limit, remaining, _ = rate_headers(r, kind)
            assert remaining < limit


def test_headers_on_the_429_too(serve, http, limiter_redis_url) -> None:
    c = http(serve(redis_url=limiter_redis_url))
    key = create_key(c, rpm=1)["key"]
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code == 200
    r = c.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert rate_headers(r, "requests")[:2] == (1, 0)


@pytest.mark.parametrize("limits", [{}, {"daily_tokens": 10**6}, {"max_parallel": 3}])
def test_no_headers_without_a_per_minute_limit(serve, http, limits) -> None:
    c = http(serve())
    key = create_key(c, **limits)["key"]
    for path, body in CALLS:
        r = c.post(path, json=body, headers=bearer(key))
        assert r.status_code == 200, (path, r.text)
        assert present(r) == set(), (path, dict(r.headers))
