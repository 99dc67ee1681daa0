"""Durability under load: SIGTERM to gunicorn loses no answered request; a PostgreSQL outage loses none."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from llm_backend.db.models import Base, Conversation, Message, RequestLog
from llm_backend.db.session import make_engine
from tests.conftest import free_port, gunicorn_server, gunicorn_worker_pids
from tests.e2e_recording.conftest import (
    count_rows,
    mock_model,
    request_rows,
    uvicorn_server,
    wait_for,
)

# -- load -----------------------------------------------------------------------------------------------------


class Load:
    """Threads that send chat requests (half of them streamed) with our own X-Request-Id until stopped.

    `answered` holds the ids of requests that got a complete 200 answer (JSON parsed, or the stream's
    `data: [DONE]`); `failed` counts everything else (refused connections after shutdown, cut streams).
    """

    def __init__(self, base_url: str, threads: int = 8, pause: float = 0.0) -> None:
        self.base_url = base_url
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answered: list[str] = []
        self.non_200: list[tuple[str, int, str]] = []
        self.failed = 0
        self.pause = pause
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def sent(self) -> int:
        with self.lock:
            return len(self.answered) + len(self.non_200) + self.failed

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=20) as client:
            i = 0
            while not self.stop_event.is_set():
                i += 1
                rid = f"load-{n}-{i}-{uuid.uuid4().hex[:8]}"
                stream = i % 2 == 0
                body = {
                    "model": "mock",
                    "messages": [{"role": "user", "content": f"request {rid}"}],
                    "stream": stream,
                }
                try:
                    r = client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": rid})
                    complete = r.status_code == 200 and (
                        r.text.rstrip().endswith("data: [DONE]") if stream else bool(r.json()["choices"])
                    )
                except (httpx.HTTPError, ValueError, KeyError):
                    with self.lock:
                        self.failed += 1
                    time.sleep(0.02)
                    continue
                with self.lock:
                    if complete:
                        self.answered.append(rid)
                    elif r.status_code != 200:
                        self.non_200.append((rid, r.status_code, r.text[:200]))
                    else:
                        self.failed += 1
                if self.pause:
                    time.sleep(self.pause)


# -- (a) SIGTERM to gunicorn under load --------------------------------------------------------------------------


@contextlib.contextmanager
def gunicorn(db_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: mock\n    backends:\n      - provider: mock\n        delay_ms: 2\n")
    env = {
        **os.environ,
        "WEB_CONCURRENCY": "2",
        "LLM_BACKEND_CONFIG": str(config),
        "LLM_BACKEND_AUTH": "none",
        "DATABASE_URL": db_url,
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "WARNING",
        "GRACEFUL_TIMEOUT": "25",
    }
    log = tmp_path / "gunicorn.log"
    with gunicorn_server(env, log) as (proc, base):
        yield proc, base, log


_worker_pids = gunicorn_worker_pids


def test_sigterm_under_load_loses_no_answered_request(db_url: str, tmp_path: Path) -> None:
    with gunicorn(db_url, tmp_path) as (proc, base, log):
        # both workers are up before the load starts (each has its own recorder)
        wait_for(lambda: len(_worker_pids(proc)) >= 2, 60, "two gunicorn workers")
        with Load(base, threads=8) as load:
            wait_for(lambda: len(load.answered) >= 150, 60, "150 answered requests")
            proc.send_signal(signal.SIGTERM)
            signalled_at = len(load.answered)
            code = proc.wait(timeout=30)
            load.stop()
        output = log.read_text()
        assert code == 0, output[-3000:]
    answered = set(load.answered)
    assert load.non_200 == [], load.non_200[:5]
    assert len(answered) >= signalled_at > 0
    rows = request_rows(db_url)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids))
    client_ids = [r["client_request_id"] for r in rows]  # the X-Request-Id each request was sent with
    missing = answered - set(client_ids)
    assert not missing, (
        f"{len(missing)} answered requests have no row, e.g. {sorted(missing)[:5]}\n{output[-3000:]}"
    )
    assert len(rows) >= len(answered)
    assert all(r["outcome"] in ("ok", "client_disconnected") for r in rows)
    # every answered request's row is complete: exact tokens from the mock's usage
    by_id = {r["client_request_id"]: r for r in rows}
    assert all(by_id[rid]["outcome"] == "ok" and not by_id[rid]["tokens_estimated"] for rid in answered)
    # nothing was left behind in a spill file: the drain wrote everything to the database
    leftovers = [p for p in (tmp_path / "data").glob("recorder-spill*.jsonl") if p.stat().st_size > 0]
    assert not leftovers, [p.read_text()[:500] for p in leftovers]


# -- (b) PostgreSQL unreachable mid-load ----------------------------------------------------------------------


class Forwarder:
    """A TCP port-forwarder to PostgreSQL that the test can stop (refusing and cutting connections) and restart."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _truncate(url: str) -> None:
    engine = make_engine(url)
    try:
        names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {names} CASCADE")
    finally:
        engine.dispose()


def _gauge(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_postgres_unreachable_mid_load_every_row_arrives_once(
    pg_migrated_url: str, app_for: Callable[..., Any]
) -> None:
    _truncate(pg_migrated_url)
    real = make_url(pg_migrated_url)
    forwarder = Forwarder((real.host or "127.0.0.1", real.port or 5432))
    forwarder.start()
    proxied = real.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
    app = app_for(proxied, [mock_model()])
    try:
        with uvicorn_server(app) as base:
            with Load(base, threads=4, pause=0.04) as load:
                wait_for(lambda: len(load.answered) >= 40, 60, "40 answered requests")
                wait_for(lambda: count_rows(pg_migrated_url, RequestLog) > 0, 60, "rows written while up")
                forwarder.stop()
                outage_from = load.sent()
                # the database is gone: serving goes on, records spill (and the metric says so)
                wait_for(lambda: _gauge(base, "llm_backend_recorder_spilled") > 0, 60, "records spilled")
                wait_for(lambda: load.sent() - outage_from >= 20, 60, "traffic going on during the outage")
                forwarder.start()
                # replayed in order while traffic goes on (a rate the in-process test setup can sustain)
                wait_for(lambda: _gauge(base, "llm_backend_recorder_spilled") == 0, 60, "spill file replayed")
                time.sleep(0.5)
            assert load.non_200 == [], load.non_200[:5]
            assert load.failed == 0
    finally:
        forwarder.stop()
    answered = set(load.answered)
    assert len(answered) == len(load.answered)
    rows = request_rows(pg_migrated_url)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids))
    client_ids = [r["client_request_id"] for r in rows]  # the X-Request-Id each request was sent with
    assert len(client_ids) == len(set(client_ids))
    assert set(client_ids) == answered, (len(ids), len(answered), sorted(answered - set(client_ids))[:5])
    # conversations and messages were not written twice by the replay either: one per request (unique prompts)
    assert count_rows(pg_migrated_url, Conversation) == len(answered)
    assert count_rows(pg_migrated_url, Message) == 2 * len(answered)
    engine = make_engine(pg_migrated_url)
    try:
        with engine.connect() as conn:
            dup = conn.execute(
                sa.select(Message.request_id, sa.func.count())
                .group_by(Message.request_id)
                .having(sa.func.count() != 2)
            ).all()
    finally:
        engine.dispose()
    assert dup == []
