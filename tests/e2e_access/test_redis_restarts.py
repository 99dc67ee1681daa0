"""The limiter's store lost or paused under a running gunicorn: budgets hold across a Redis restart without
persistence (re-seeded from the request log), and parallel slots come back as soon as a paused Redis answers."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer

from llm_backend.db import migrate
from llm_backend.limits import estimate_tokens
from tests.conftest import gunicorn_server
from tests.e2e_access.conftest import ADMIN, assert_openai_error, bearer, table_rows
from tests.e2e_access.private_services import private_redis, server_env, wait_for
from tests.e2e_access.test_limits import GatedUpstream

pytestmark = pytest.mark.fault

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}


def _create_key(url: str, **limits: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/admin/keys", json={"name": "budget", **limits}, headers=ADMIN, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def _spend(url: str, key: str, n: int) -> tuple[list[int], list[httpx.Response]]:
    """n sequential requests; the usage of the admitted ones and the refusals."""
    used, refused = [], []
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(n):
            r = c.post(CHAT, json=BODY, headers=bearer(key))
            if r.status_code == 200:
                usage = r.json()["usage"]
                assert usage["total_tokens"] <= estimate_tokens(BODY)  # the estimate covers it: strict
                used.append(usage["total_tokens"])
            else:
                refused.append(r)
    return used, refused


def _logged_tokens(db_url: str, key_id: str) -> int:
    return sum(
        int(r["total_tokens"] or 0) for r in table_rows(db_url, "request_log") if r["key_id"] == key_id
    )


def test_daily_budget_holds_across_a_redis_restart(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'budget.db'}"
    migrate.upgrade(db_url)
    with private_redis() as redis_server:
        env = server_env(tmp_path, db_url, REDIS_URL=redis_server.url, LLM_BACKEND_RECORDING="true")
        env["WEB_CONCURRENCY"] = "2"
        with gunicorn_server(env, tmp_path / "gunicorn.log", ready_path="/healthz") as (_, url):
            key = _create_key(url, daily_tokens=100)
            used, refused = _spend(url, key["key"], 6)
            assert used and refused, (used, refused)
            assert sum(used) <= 100
            for r in refused:
                assert_openai_error(r, 429, code="insufficient_quota")
            # the recorder has written what was served (it batches every quarter second)
            wait_for(lambda: _logged_tokens(db_url, key["id"]) == sum(used), what="the request log")

            redis_server.restart()
            client = redis_server.client()
            assert client.dbsize() == 0  # every counter is gone
            after, refused_after = _spend(url, key["key"], 6)
            assert sum(used) + sum(after) <= 100, (used, after)  # the incident: 147 of 100 went through
            assert len(refused_after) == 6 - len(after)
            for r in refused_after:
                assert_openai_error(r, 429, code="insufficient_quota")
            # the counter was seeded from the request log, once, by whichever worker came first
            state = client.hgetall(f"llmb:rl:{{{key['id']}}}:s")
            assert int(state["du"]) >= sum(used), state
            assert state["sd"] == state["d"], state
            client.close()


def test_in_process_budget_holds_for_a_fresh_worker(serve: Any, http: Any, sqlite_url: str) -> None:
    """Without Redis each worker counts alone: a new worker (a restart) re-seeds from the request log."""
    first = serve(recording=True)
    c = http(first)
    key = c.post("/admin/keys", json={"name": "b", "daily_tokens": 100}, headers=ADMIN).json()
    used, refused = _spend(first, key["key"], 6)
    assert used and refused
    serve.stop(first)  # drains the recorder
    assert _logged_tokens(sqlite_url, key["id"]) == sum(used)

    second = serve(recording=True)
    after, refused_after = _spend(second, key["key"], 4)
    assert sum(used) + sum(after) <= 100, (used, after)
    assert refused_after


GATED_YAML = """
models:
  - name: gated
    retries: 0
    backends:
      - provider: openai
        name: gated
        base_url: {url}
        api_key: upstream-key
"""


def test_parallel_slots_come_back_after_redis_pauses_while_requests_settle(tmp_path: Path) -> None:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    gate = GatedUpstream(server)  # answers wait for gate.release
    db_url = f"sqlite:///{tmp_path / 'slots.db'}"
    migrate.upgrade(db_url)
    config = tmp_path / "gated.yaml"
    config.write_text(GATED_YAML.format(url=server.url_for("/v1")), encoding="utf-8")
    try:
        with private_redis() as redis_server:
            # a lease far longer than the test: the slots can only come back through the settle retries
            env = server_env(
                tmp_path,
                db_url,
                REDIS_URL=redis_server.url,
                LLM_BACKEND_CONFIG=str(config),
                LIMITER_LEASE_S="600",
            )
            with gunicorn_server(env, tmp_path / "gunicorn.log", ready_path="/healthz") as (_, url):
                key = _create_key(url, max_parallel=2)
                body = {"model": "gated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

                def call() -> httpx.Response:
                    return httpx.post(f"{url}{CHAT}", json=body, headers=bearer(key["key"]), timeout=60)

                pool = concurrent.futures.ThreadPoolExecutor(4)
                running = [pool.submit(call) for _ in range(2)]
                wait_for(lambda: gate.arrived == 2, what="two requests in flight")
                assert_openai_error(call(), 429, code="rate_limit_exceeded")  # both slots taken

                redis_server.pause()  # Redis stops answering while the two requests end and settle
                gate.release.set()
                for f in running:
                    assert f.result(timeout=60).status_code == 200
                time.sleep(2.0)  # a pause of a few seconds
                redis_server.resume()
                resumed = time.monotonic()

                client = redis_server.client()
                inflight = f"llmb:rl:{{{key['id']}}}:p"
                wait_for(lambda: client.zcard(inflight) == 0, timeout=30, what="the slots to be released")
                released_after = time.monotonic() - resumed
                assert released_after < 30  # the retry, not the 600 s lease
                answers = list(pool.map(lambda _: call(), range(2)))
                assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
                client.close()
                pool.shutdown()
    finally:
        gate.release.set()
        server.clear()
        server.stop()
