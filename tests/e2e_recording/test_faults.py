"""Recording under faults, through gunicorn: a full disk with the database down, SIGKILL of a worker.

The full-disk test mounts a tiny tmpfs as the data directory (skipped where mounting is not allowed) and
runs its own PostgreSQL (initdb/pg_ctl into a temporary directory), which it stops and starts again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_backend.db import migrate
from tests.conftest import gunicorn_server, gunicorn_worker_pids
from tests.e2e_access.private_services import PrivatePostgres
from tests.e2e_access.private_services import private_postgres as shared_private_postgres
from tests.e2e_recording.conftest import request_rows, wait_for
from tests.e2e_recording.test_durability import Load

# -- a private PostgreSQL and a tiny disk ----------------------------------------------------------------------


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """The shared private PostgreSQL, migrated."""
    with shared_private_postgres() as pg:
        migrate.upgrade(pg.url)
        yield pg


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs for the full-disk test: {done.stderr.decode(errors='replace').strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Fill the file system of `path` to the last byte."""
    with (path / "filler").open("ab", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def gauge_in(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def env_for(
    tmp_path: Path, database_url: str, data_dir: Path, *, delay_ms: int = 2, workers: int = 2
) -> dict[str, str]:
    config = tmp_path / "models.yaml"
    config.write_text(
        f"models:\n  - name: mock\n    backends:\n      - provider: mock\n        delay_ms: {delay_ms}\n"
    )
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {
        **os.environ,
        "WEB_CONCURRENCY": str(workers),
        "LLM_BACKEND_CONFIG": str(config),
        "LLM_BACKEND_AUTH": "none",
        "DATABASE_URL": database_url,
        "LLM_BACKEND_DATA_DIR": str(data_dir),
        "TMPDIR": str(tmp_path / "tmp"),  # where the recorder keeps what no journal can take
        "LOG_LEVEL": "WARNING",
        "GRACEFUL_TIMEOUT": "25",
    }


def assert_one_ok_row_each(url: str, answered: set[str]) -> dict[str, dict[str, Any]]:
    rows = request_rows(url)
    ids = [r["client_request_id"] for r in rows]  # the X-Request-Id each request was sent with
    assert len(ids) == len(set(ids)), "a request was recorded twice"
    assert len({r["request_id"] for r in rows}) == len(rows)
    missing = answered - set(ids)
    assert not missing, f"{len(missing)} answered requests have no row, e.g. {sorted(missing)[:5]}"
    by_id = {r["client_request_id"]: r for r in rows}
    assert all(by_id[rid]["outcome"] == "ok" for rid in answered)
    return by_id


# -- item 3: database down, disk full ------------------------------------------------------------------------


@pytest.mark.fault
def test_full_disk_with_the_database_down_loses_no_answered_request(tmp_path: Path) -> None:
    with private_postgres() as pg, tiny_disk(tmp_path / "data") as data:
        env = env_for(tmp_path, pg.url, data)
        log = tmp_path / "gunicorn.log"
        with gunicorn_server(env, log, timeout=30) as (proc, base):
            wait_for(lambda: len(gunicorn_worker_pids(proc)) >= 2, 20, "two workers")
            pg.stop()
            fill(data)
            with Load(base, threads=8) as load:
                wait_for(lambda: len(load.answered) >= 800, 120, "800 answered requests")
            assert load.non_200 == [], load.non_200[:5]
            answered = set(load.answered)
            assert len(answered) >= 800

            # nothing dropped, and it says so: the readiness body and the metrics. Both are per worker and
            # a fresh connection may reach either, the one that served no request among them: wait until
            # one that holds records answers (a single scrape or probe is one worker's view).
            def degraded_ready() -> bool:
                ready = httpx.get(f"{base}/readyz", timeout=5).json()
                assert ready["checks"]["recorder"]["ok"] is True, ready
                return str(ready["checks"]["recorder"]["message"]).startswith("degraded:")

            def kept_in_memory() -> bool:
                text = httpx.get(f"{base}/metrics", timeout=5).text
                assert gauge_in(text, "llm_backend_recorder_dropped_total") == 0
                return (
                    gauge_in(text, "llm_backend_recorder_memory_only") > 0
                    and gauge_in(text, "llm_backend_recorder_journal_ok") == 0
                )

            wait_for(degraded_ready, 30, "a worker's readiness saying degraded")
            wait_for(kept_in_memory, 30, "a worker's metrics showing records kept in memory")
            # the database is back: every record goes in from memory, without waiting for a free disk
            pg.start()
            wait_for(
                lambda: answered <= {r["client_request_id"] for r in request_rows(pg.url)},
                60,
                "every row written",
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0, log.read_text()[-3000:]
        assert_one_ok_row_each(pg.url, answered)
        output = log.read_text()
        assert (
            "cannot be written" in output
        )  # the journal's trouble was logged (once a minute, not per record)
        assert output.count("cannot be written") <= 4, output[-3000:]

    # start-up with a data directory that cannot exist (a file in its way): boots, serves, records
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    with private_postgres() as pg:
        env = env_for(tmp_path, pg.url, blocked / "data", workers=1)
        log = tmp_path / "gunicorn-2.log"
        with gunicorn_server(env, log, timeout=30) as (proc, base):
            with Load(base, threads=2) as load:
                wait_for(lambda: len(load.answered) >= 20, 30, "20 answered requests")
            first = set(load.answered)
            wait_for(
                lambda: first <= {r["client_request_id"] for r in request_rows(pg.url)}, 30, "rows written"
            )
            # then the database goes away too: SIGTERM's drain says where it kept what it could not write
            pg.stop()
            with Load(base, threads=2) as load:
                wait_for(lambda: len(load.answered) >= 10, 30, "10 answered requests")
            second = set(load.answered)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        output = log.read_text()
        kept = list((tmp_path / "tmp").glob("*.unwritten.jsonl"))
        assert kept, output[-3000:]
        kept_ids = {
            json.loads(line)["client_request_id"] for p in kept for line in p.read_text().splitlines()
        }
        assert second <= kept_ids
        assert "recorder stopped" in output and str(kept[0]) in output, output[-3000:]


# -- item 4: SIGKILL of a worker -----------------------------------------------------------------------------


class StreamLoad:
    """Threads sending JSON and (slow) streamed chat requests, noting what each client saw."""

    def __init__(self, base_url: str, threads: int = 8) -> None:
        self.base_url = base_url
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answered: set[str] = set()  # a complete answer (JSON parsed, or [DONE])
        self.cut: set[str] = set()  # a stream that got a 200 and content, then was cut
        self.headers_only: set[str] = set()  # a 200 stream cut before any content
        self.streaming: set[str] = set()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> StreamLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        while not self.stop_event.is_set():
            rid = f"kill-{n}-{uuid.uuid4().hex[:10]}"
            stream = rng.random() < 0.6
            body = {
                "model": "mock",
                "messages": [{"role": "user", "content": f"tell me about {rid}"}],
                "stream": stream,
            }
            content = False
            status = None
            try:
                with httpx.Client(base_url=self.base_url, timeout=20) as client:
                    if not stream:
                        r = client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": rid})
                        if r.status_code == 200 and r.json()["choices"]:
                            with self.lock:
                                self.answered.add(rid)
                        continue
                    with client.stream(
                        "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}
                    ) as r:
                        status = r.status_code
                        with self.lock:
                            self.streaming.add(rid)
                        text = ""
                        for chunk in r.iter_text():
                            text += chunk
                            content = content or '"content":"' in text.replace('"content":""', "")
                        if text.rstrip().endswith("data: [DONE]"):
                            with self.lock:
                                self.answered.add(rid)
                        else:
                            raise httpx.RemoteProtocolError("stream ended without [DONE]")
            except (httpx.HTTPError, ValueError, KeyError):
                if stream and status == 200:
                    with self.lock:
                        (self.cut if content else self.headers_only).add(rid)
                time.sleep(0.02)
            finally:
                with self.lock:
                    self.streaming.discard(rid)


@pytest.mark.fault
def test_sigkill_of_a_worker_leaves_a_row_for_everything_the_upstream_served(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    migrate.upgrade(url)
    env = env_for(tmp_path, url, tmp_path / "data", delay_ms=30)
    log = tmp_path / "gunicorn.log"
    with gunicorn_server(env, log, timeout=30) as (proc, base):
        wait_for(lambda: len(gunicorn_worker_pids(proc)) >= 2, 20, "two workers")
        with StreamLoad(base, threads=8) as load:
            for _ in range(3):
                before = len(load.answered)
                wait_for(lambda: len(load.answered) >= before + 20, 30, "answers before the kill")
                wait_for(lambda: len(load.streaming) >= 2, 30, "streams in flight")
                victim = int(gunicorn_worker_pids(proc)[0])
                os.kill(victim, signal.SIGKILL)  # what the OOM killer does
                wait_for(
                    lambda: (
                        len(gunicorn_worker_pids(proc)) >= 2 and str(victim) not in gunicorn_worker_pids(proc)
                    ),
                    30,
                    "a replacement worker",
                )
            wait_for(lambda: len(load.answered) >= before + 40, 30, "answers after the last kill")
        # the replacement of the last victim takes its journal over once it has booted
        expected = load.answered | load.cut | load.headers_only
        wait_for(
            lambda: expected <= {r["client_request_id"] for r in request_rows(url)},
            60,
            "rows of every request",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()[-3000:]
    by_id = assert_one_ok_row_each(url, load.answered)
    # every stream the upstream started got a row, though its worker died: interrupted, tokens estimated
    assert load.cut, "no stream was cut by the kills; the test proved nothing"
    for rid in load.cut | load.headers_only:
        assert rid in by_id, f"cut stream {rid} has no row\n{log.read_text()[-2000:]}"
        row = by_id[rid]
        if row["outcome"] == "ok":
            continue  # the record was journaled before [DONE], and the kill came between the two
        assert row["outcome"] == "interrupted" and row["error_type"] == "worker_died", row
        assert row["tokens_estimated"] is True and row["prompt_tokens"] > 0, row
        assert row["stream"] is True and row["provider"] == "mock" and row["backend"]
        if rid in load.cut:
            assert row["completion_tokens"] > 0, row  # what was relayed before the kill, estimated
    assert any(by_id[rid]["outcome"] == "interrupted" for rid in load.cut)
    # the dead workers' journals were taken over and replayed; what is left is empty
    leftovers = [p for p in (tmp_path / "data").glob("recorder-spill*") if p.stat().st_size > 0]
    assert not leftovers, [p.read_text()[:300] for p in leftovers]
