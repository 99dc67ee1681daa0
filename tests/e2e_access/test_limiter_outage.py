"""Redis unreachable: by default requests go through unchecked with an error log and a metric (fail open);
with limiter_fail_open=False they are refused with an OpenAI-shaped 503."""

from __future__ import annotations

import logging
import re

from tests.e2e_access.conftest import assert_openai_error, bearer, chat, create_key

DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def test_fail_open_serves_and_logs_an_error(serve, http, caplog):
    caplog.set_level(logging.INFO)
    c = http(serve(redis_url=DOWN))
    key = create_key(c, rpm=1, tpm=100, daily_tokens=10)["key"]
    statuses = [
        c.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code for _ in range(3)
    ]
    assert statuses == [200] * 3  # unchecked, even beyond the key's limits
    assert c.post("/v1/chat/completions", json=chat(stream=True), headers=bearer(key)).status_code == 200
    errors = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and r.name.startswith("llm_backend.limits")
        and "Redis" in r.getMessage()
    ]
    assert errors, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert key not in caplog.text
    metrics = c.get("/metrics").text
    match = re.search(r"^llm_backend_limiter_errors_total(?:\{[^}]*\})? (\S+)$", metrics, re.M)
    assert match and float(match.group(1)) >= 1, metrics


def test_fail_closed_refuses_with_503(serve, http):
    c = http(serve(redis_url=DOWN, limiter_fail_open=False))
    limited = create_key(c, "limited", rpm=100)["key"]
    for body in (chat(), chat(stream=True)):
        r = c.post("/v1/chat/completions", json=body, headers=bearer(limited))
        assert_openai_error(r, 503, code="limiter_unavailable")
        assert r.headers["retry-after"].isdigit()
    r = c.post("/v1/embeddings", json={"model": "m", "input": "hi"}, headers={"api-key": limited})
    assert_openai_error(r, 503, code="limiter_unavailable")
    # a key without limits has nothing to count and is served; auth and models still apply first
    free = create_key(c, "unlimited")["key"]
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(free)).status_code == 200
    assert_openai_error(c.post("/v1/chat/completions", json=chat()), 401, code="invalid_api_key")
