"""/metrics through gunicorn: every dashboard query reads exported metrics, and the workers are summed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer

from llm_backend.db import migrate
from tests.conftest import REPO, gunicorn_server, gunicorn_worker_pids
from tests.metrics.promql import family_of, grafana_query_names, metric_names

DASHBOARD = REPO / "deploy" / "grafana" / "llm-backend.json"
ADMIN_KEY = "admin-" + "x" * 30
METRICS_TOKEN = "metrics-" + "y" * 30
CHAT_ROUTE = "/v1/chat/completions"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def scrape(
    base: str, token: str | None = METRICS_TOKEN
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{base}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expression) of every panel target and every templating query of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(doc["panels"]):
        for t in p.get("targets", []):
            found.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", "label_values:" + query))
    return found


def test_dashboard_is_importable_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("requests", "tokens", "spend", "latency", "first token", "error", "breaker", "recorder"):
        assert topic in titles, topic
    assert "limiter" in titles and "journal" in titles
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
    exprs = " ".join(e for _, e in dashboard_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in exprs


# -- the app under a mixed load ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[HTTPServer]:
    """A fake OpenAI: /down answers 500 (the model fails over), /busy answers 429 (its backend cools down)."""
    server = HTTPServer()
    server.start()
    error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    server.expect_request("/down/v1/chat/completions").respond_with_json(error, status=500)
    limited = {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}}
    server.expect_request("/busy/v1/chat/completions").respond_with_json(
        limited, status=429, headers={"Retry-After": "600"}
    )
    yield server
    server.clear()
    server.stop()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, upstream: HTTPServer) -> Iterator[tuple[str, Path, str]]:
    """gunicorn with two workers, keys, limits and recording, after chats, streams, embeddings, a
    failover, an upstream 429, limiter refusals, validation errors and junk."""
    tmp = tmp_path_factory.mktemp("metrics")
    models = tmp / "models.yaml"
    models.write_text(
        "models:\n"
        "  - name: m\n    prices: {input: 2.5, cached_input: 1.25, output: 10}\n"
        "    backends:\n      - {provider: mock, name: mock-a}\n"
        "  - name: flaky\n    backends:\n"
        f"      - {{provider: openai, name: down, base_url: '{upstream.url_for('/down/v1')}', api_key: k, "
        "priority: 0}\n"
        "      - {provider: mock, name: mock-b, priority: 1}\n"
        "  - name: busy\n    backends:\n"
        f"      - {{provider: openai, name: limited, base_url: '{upstream.url_for('/busy/v1')}', api_key: k}}\n"
    )
    db = f"sqlite:///{tmp}/metrics.db"
    migrate.upgrade(db)
    metrics_dir = tmp / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_99999999.db").write_bytes(b"left over")  # an earlier run's: wiped at start
    env = {
        **os.environ,
        "WEB_CONCURRENCY": "2",
        "LLM_BACKEND_CONFIG": str(models),
        "LLM_BACKEND_AUTH": "keys",
        "LLM_BACKEND_ADMIN_KEY": ADMIN_KEY,
        "METRICS_TOKEN": METRICS_TOKEN,
        "DATABASE_URL": db,
        "LLM_BACKEND_DATA_DIR": str(tmp / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "LOG_LEVEL": "WARNING",
    }
    with gunicorn_server(env, tmp / "gunicorn.log", timeout=60) as (proc, base):
        wait_for(lambda: len(gunicorn_worker_pids(proc)) >= 2, 30, "two workers")
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        key = httpx.post(f"{base}/admin/keys", json={"name": "load"}, headers=admin, timeout=10).json()["key"]
        tight = httpx.post(f"{base}/admin/keys", json={"name": "tight", "rpm": 1}, headers=admin, timeout=10)
        auth = {"Authorization": f"Bearer {key}"}
        tight_auth = {"Authorization": f"Bearer {tight.json()['key']}"}
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(3):
                assert c.post(CHAT_ROUTE, json=chat("m"), headers=auth).status_code == 200
            with c.stream("POST", CHAT_ROUTE, json=chat("m", stream=True), headers=auth) as r:
                assert r.status_code == 200 and b"[DONE]" in r.read()
            r = c.post("/v1/embeddings", json={"model": "m", "input": "some text"}, headers=auth)
            assert r.status_code == 200, r.text
            assert c.post(CHAT_ROUTE, json=chat("flaky"), headers=auth).status_code == 200  # via mock-b
            assert c.post(CHAT_ROUTE, json=chat("busy"), headers=auth).status_code == 429  # upstream's
            assert c.post(CHAT_ROUTE, json=chat("client-invented"), headers=auth).status_code == 404
            assert c.post(CHAT_ROUTE, json={"model": "m"}, headers=auth).status_code == 400
            statuses = [c.post(CHAT_ROUTE, json=chat("m"), headers=tight_auth).status_code for _ in range(3)]
            assert statuses[0] == 200 and 429 in statuses[1:], statuses  # the limiter's
            assert c.get("/v1/no-such-route", headers=auth).status_code == 404
            assert (
                c.post(CHAT_ROUTE, json=chat("m"), headers={"Authorization": "Bearer nope"}).status_code
                == 401
            )
        yield base, metrics_dir, db


def test_metrics_need_the_token(loaded: tuple[str, Path, str]) -> None:
    base, _, _ = loaded
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401


def test_every_dashboard_query_reads_exported_metrics(loaded: tuple[str, Path, str]) -> None:
    base, _, _ = loaded
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    family = {s.name: f.name for f in text_string_to_metric_families(r.text) for s in f.samples}
    exported = set(family)
    families = set(family.values())
    missing = []
    read = set()
    for where, expr in dashboard_queries():
        if expr.startswith("label_values:"):
            names = grafana_query_names(expr.removeprefix("label_values:"))
        else:
            names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            read.add(name)
            if name not in exported:
                missing.append(f"{where}: {name} (family {family_of(name, families)})")
    assert not missing, "\n".join(missing)
    # and the dashboard shows what operators need: nothing the app counts is left off it
    unread = families - {family[n] for n in read}
    assert unread <= {"llm_backend_limiter_settle_retries"}, unread


def test_mixed_load_is_counted_with_bounded_labels(loaded: tuple[str, Path, str]) -> None:
    base, _, db = loaded
    samples = wait_for(
        lambda: (s := scrape(base)) and total(s, "llm_backend_recorder_written_total") >= 12 and s,
        60,
        "the recorder's writes published",
    )
    labels = {k: v for _, ls in samples for k, v in ls}
    models = {v for (_, ls) in samples for k, v in ls if k == "model"}
    assert models <= {"", "m", "flaky", "busy", "other"}, models
    assert "client-invented" not in str(samples) and "no-such-route" not in str(samples)
    routes = {v for (_, ls) in samples for k, v in ls if k == "route"}
    assert all(r.startswith("/") or r == "other" for r in routes) and "{" not in "".join(routes - {"other"})
    assert "pid" not in labels  # summed over the workers, not one series each

    req = "llm_backend_requests_total"
    assert total(samples, req, route=CHAT_ROUTE, model="m", status="200", backend="mock-a", outcome="ok") == 5
    assert total(samples, req, route="/v1/embeddings", model="m", status="200") == 1
    assert total(samples, req, route=CHAT_ROUTE, model="flaky", status="200", backend="mock-b") == 1
    assert total(samples, req, route=CHAT_ROUTE, model="busy", status="429", outcome="error") == 1
    assert total(samples, req, route=CHAT_ROUTE, model="other", status="404") == 1
    assert total(samples, req, route=CHAT_ROUTE, status="400") == 1
    assert total(samples, "llm_backend_rejected_total", reason="unknown_route") == 1
    assert (
        total(samples, "llm_backend_rejected_total", reason="unauthenticated") >= 1
    )  # + wrong metrics tokens
    assert total(samples, "llm_backend_limiter_refusals_total", reason="requests") >= 1
    assert total(samples, "llm_backend_tokens_total", model="m", kind="prompt") > 0
    assert total(samples, "llm_backend_tokens_total", model="m", kind="completion") > 0
    assert total(samples, "llm_backend_time_to_first_token_seconds_count", model="m") == 1
    assert total(samples, "llm_backend_request_duration_seconds_count", route=CHAT_ROUTE) >= 10
    assert total(samples, "llm_backend_upstream_failovers_total", model="flaky") == 1
    assert total(samples, "llm_backend_upstream_errors_total", backend="down", kind="5xx") == 1
    assert total(samples, "llm_backend_upstream_errors_total", backend="limited", kind="429") == 1
    assert total(samples, "llm_backend_upstream_attempts_total", model="flaky") == 2
    # spend: what the request log says the requests cost, at the models file's prices (only m has some)
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        costs = dict(conn.execute("SELECT model, sum(cost) FROM request_log GROUP BY model").fetchall())
    assert costs["m"] > 0
    assert total(samples, "llm_backend_spend_total", model="m") == pytest.approx(costs["m"], rel=1e-9)
    assert total(samples, "llm_backend_spend_total") == pytest.approx(costs["m"], rel=1e-9)

    # the worker that took the 429 says so within a refresh, whichever worker answers the scrape
    def cooling() -> bool:
        return total(scrape(base), "llm_backend_backend_cooldown_seconds", backend="limited") > 100

    wait_for(cooling, 30, "the cool-down published")
    breaker = total(scrape(base), "llm_backend_backend_breaker_state", model="m", backend="mock-a")
    assert breaker == 0


def test_the_metrics_directory_starts_empty(loaded: tuple[str, Path, str]) -> None:
    _, metrics_dir, _ = loaded
    assert not (metrics_dir / "counter_99999999.db").exists()
    assert list(metrics_dir.glob("counter_*.db"))


# -- several workers, one of them dying ---------------------------------------------------------------------


def migrated(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/t.db"
    migrate.upgrade(url)
    return url


def per_worker_requests(metrics_dir: Path) -> dict[str, float]:
    """Chat requests counted in each worker's own file (what one scrape must sum)."""
    from prometheus_client import multiprocess

    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        metrics = multiprocess.MultiProcessCollector.merge([str(path)], accumulate=False)
        counts[path.stem.split("_")[1]] = sum(
            s.value
            for m in metrics
            for s in m.samples
            if s.name == "llm_backend_requests_total" and s.labels.get("route") == CHAT_ROUTE
        )
    return counts


def test_one_scrape_sums_the_workers_and_keeps_a_dead_ones_counts(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: m\n    backends:\n      - {provider: mock, name: mock-a}\n")
    metrics_dir = tmp_path / "prom"
    env = {
        **os.environ,
        "WEB_CONCURRENCY": "2",
        "LLM_BACKEND_CONFIG": str(models),
        "LLM_BACKEND_AUTH": "none",
        "LLM_BACKEND_RECORDING": "false",
        "DATABASE_URL": migrated(tmp_path),
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "LOG_LEVEL": "WARNING",
    }
    sent = 0

    def burst(base: str, n: int) -> None:
        # a fresh connection each: the kernel hands them to whichever worker accepts first
        def one(_: int) -> int:
            return httpx.post(
                base + CHAT_ROUTE, json=chat("m"), headers={"Connection": "close"}, timeout=30
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(n))) == {200}

    with gunicorn_server(env, tmp_path / "gunicorn.log", timeout=60) as (proc, base):
        wait_for(lambda: len(gunicorn_worker_pids(proc)) >= 2, 30, "two workers")
        workers = set(gunicorn_worker_pids(proc))
        deadline = time.monotonic() + 120
        while not all(per_worker_requests(metrics_dir).get(pid, 0) > 0 for pid in workers):
            assert time.monotonic() < deadline, (
                "one worker served everything",
                per_worker_requests(metrics_dir),
            )
            burst(base, 40)
            sent += 40
        assert total(scrape(base, None), "llm_backend_requests_total", route=CHAT_ROUTE) == sent
        assert sum(per_worker_requests(metrics_dir).values()) == sent

        victim = sorted(workers)[0]
        os.kill(int(victim), signal.SIGKILL)
        wait_for(
            lambda: len(set(gunicorn_worker_pids(proc)) - {victim}) >= 2,
            60,
            "gunicorn to replace the killed worker",
        )
        # its counters stay in the sum, once; its live gauges (in flight) are gone
        wait_for(lambda: not list(metrics_dir.glob(f"gauge_livesum_{victim}.db")), 30, "its gauges dropped")
        assert total(scrape(base, None), "llm_backend_requests_total", route=CHAT_ROUTE) == sent
        burst(base, 20)
        sent += 20
        samples = scrape(base, None)
        assert total(samples, "llm_backend_requests_total", route=CHAT_ROUTE) == sent
        assert total(samples, "llm_backend_request_duration_seconds_count", route=CHAT_ROUTE) == sent
        assert total(samples, "llm_backend_in_flight_requests") >= 1  # the scrape itself, at most a few
        assert total(samples, "llm_backend_in_flight_requests") <= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert metrics_dir.exists()  # an operator's directory is emptied at start, never removed


def test_a_private_metrics_directory_is_removed_when_gunicorn_exits(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: m\n    backends:\n      - {provider: mock}\n")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "WEB_CONCURRENCY": "1",
        "LLM_BACKEND_CONFIG": str(models),
        "LLM_BACKEND_AUTH": "none",
        "LLM_BACKEND_RECORDING": "false",
        "DATABASE_URL": migrated(tmp_path),
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "TMPDIR": str(private_tmp),
        "LOG_LEVEL": "WARNING",
    }
    with gunicorn_server(env, tmp_path / "gunicorn.log", timeout=60) as (proc, base):
        assert httpx.post(base + CHAT_ROUTE, json=chat("m"), timeout=30).status_code == 200
        assert total(scrape(base, None), "llm_backend_requests_total", route=CHAT_ROUTE) == 1
        dirs = list(private_tmp.glob("llm-backend-metrics-*"))
        assert len(dirs) == 1 and list(dirs[0].glob("counter_*.db"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not list(private_tmp.glob("llm-backend-metrics-*"))


def test_single_process_apps_keep_their_own_counts(make_client: Callable[..., Any]) -> None:
    """Apps built by create_app in one process (tests, uvicorn alone) each count only their requests."""
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    first, second = make_client(), make_client()
    assert first.post(CHAT_ROUTE, json=chat("mock")).status_code == 200
    for c, want in ((first, 1), (second, 0)):
        text = c.get("/metrics").text
        got = sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "llm_backend_requests_total" and s.labels["route"] == CHAT_ROUTE
        )
        assert got == want


def test_counts_made_during_shutdown_reach_the_files(tmp_path: Path) -> None:
    """The recorder's last writes (its drain at SIGTERM) are in the summed counters a worker leaves."""
    from prometheus_client import CollectorRegistry, multiprocess

    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: m\n    backends:\n      - {provider: mock}\n")
    metrics_dir = tmp_path / "prom"
    db = migrated(tmp_path)
    env = {
        **os.environ,
        "WEB_CONCURRENCY": "1",
        "LLM_BACKEND_CONFIG": str(models),
        "LLM_BACKEND_AUTH": "none",
        "DATABASE_URL": db,
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "LOG_LEVEL": "WARNING",
    }
    with gunicorn_server(env, tmp_path / "gunicorn.log", timeout=60) as (proc, base):
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(5):
                assert c.post(CHAT_ROUTE, json=chat("m")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    assert registry.get_sample_value("llm_backend_recorder_written_total") == 5
    chats = [
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "llm_backend_requests_total" and s.labels["route"] == CHAT_ROUTE
    ]
    assert sum(chats) == 5
