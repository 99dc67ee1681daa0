"""Fixtures of the hostile-load tests: gunicorn with one worker as users run it, raw sockets, fd limits."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import gunicorn_server, gunicorn_worker_pids

MODELS_YAML = """
models:
  - name: m
    aliases: [gpt-4o]
    backends:
      - provider: mock
        name: m-mock
        delay_ms: ${MOCK_DELAY_MS:-0}
"""


@pytest.fixture(scope="module", autouse=True)
def many_file_descriptors() -> Iterator[None]:
    """Thousands of client sockets need more descriptors than the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 20_000 if hard == resource.RLIM_INFINITY else min(hard, 20_000)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def hostile_server(tmp_path: Path) -> Iterator[Callable[..., tuple[str, int]]]:
    """Start gunicorn (one worker, mock model, no auth, no recording) with extra env; yields (url, worker pid)."""
    config = tmp_path / "models.yaml"
    config.write_text(MODELS_YAML)
    with contextlib.ExitStack() as stack:

        def start(**env: str) -> tuple[str, int]:
            full = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LLM_BACKEND_CONFIG": str(config),
                "LLM_BACKEND_AUTH": "none",
                "LLM_BACKEND_RECORDING": "false",
                "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
                "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "WEB_CONCURRENCY": "1",
                "LOG_LEVEL": "warning",
                **env,
            }
            proc, url = stack.enter_context(
                gunicorn_server(full, tmp_path / "gunicorn.log", ready_path="/healthz")
            )
            deadline = time.monotonic() + 30
            while not (workers := gunicorn_worker_pids(proc)):
                assert time.monotonic() < deadline, "no gunicorn worker"
                time.sleep(0.05)
            return url, int(workers[0])

        yield start


def address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_answer(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_until(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
