"""Served the production way (gunicorn + uvicorn workers, configured by the environment, keys from the CLI):
two processes sharing Redis enforce one limit together; without Redis each process counts alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import gunicorn_server
from tests.e2e_access.conftest import (
    CLI,
    KEY_FORMAT,
    REPO,
    assert_openai_error,
    bearer,
    chat,
    redis_or_skip,
    remember_key,
)

MODELS_YAML = """\
models:
  - name: m
    backends:
      - provider: mock
        delay_ms: 0
"""


def base_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    """A clean environment: nothing of the caller's LLM_BACKEND_*, REDIS_URL, Azure or OpenAI settings."""
    config = tmp_path / "models.yaml"
    config.write_text(MODELS_YAML, encoding="utf-8")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        "DATABASE_URL": database_url,
        "LLM_BACKEND_AUTH": "keys",
        "LLM_BACKEND_CONFIG": str(config),
        "LLM_BACKEND_RECORDING": "false",
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "WARNING",
    }


@contextlib.contextmanager
def gunicorn(env: dict[str, str], log: Path) -> Iterator[str]:
    """One gunicorn process (gunicorn.conf.py, one uvicorn worker) on a free port; yields its URL."""
    with gunicorn_server(env, log, ready_path="/healthz") as (_, url):
        yield url


def cli_key(database_url: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_BACKEND_", "REDIS_"))}
    env["DATABASE_URL"] = database_url
    proc = subprocess.run(
        [str(CLI), "keys", "create", "--name", "two-replicas", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    key = proc.stdout.strip().splitlines()[-1]
    assert KEY_FORMAT.match(key), proc.stdout
    remember_key(proc.stdout.split("created key ", 1)[1].split()[0])
    return key


async def burst(urls: list[str], key: str, n: int) -> list[tuple[str, httpx.Response]]:
    """n concurrent requests, alternating between the servers."""
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        targets = [urls[i % len(urls)] for i in range(n)]
        answers = await asyncio.gather(
            *(c.post(f"{u}/v1/chat/completions", json=chat(), headers=bearer(key)) for u in targets)
        )
    return list(zip(targets, answers, strict=True))


@pytest.mark.redis
async def test_two_processes_sharing_redis_enforce_one_limit(tmp_path, db_url):
    redis_url = redis_or_skip()
    # a loaded machine may take longer than the production timeout (1 s) to answer, which would fail open
    env = {**base_env(tmp_path, db_url), "REDIS_URL": redis_url, "REDIS_TIMEOUT_S": "30"}
    key = cli_key(db_url, "--models", "m", "--rpm", "10")
    with gunicorn(env, tmp_path / "a.log") as a, gunicorn(env, tmp_path / "b.log") as b:
        results = await burst([a, b], key, 40)
    ok = [(u, r) for u, r in results if r.status_code == 200]
    assert len(ok) == 10, sorted(r.status_code for _, r in results)
    for url in (a, b):
        refused = [r for u, r in results if u == url and r.status_code != 200]
        assert len(refused) >= 10  # each process refused its share: the count is shared, not per process
        for r in refused:
            assert_openai_error(r, 429, code="rate_limit_exceeded")
            assert r.headers["x-ratelimit-remaining-requests"] == "0"


async def test_two_processes_without_redis_count_separately(tmp_path, sqlite_url):
    """The documented limit of the in-process limiter: each process enforces the key's limit on its own.
    (Shows the burst above really reaches both processes: with Redis it is 10, here 2 x 10.)"""
    env = base_env(tmp_path, sqlite_url)
    key = cli_key(sqlite_url, "--rpm", "10")
    fenced = cli_key(sqlite_url, "--allow-ip", "10.0.0.0/8")
    with gunicorn(env, tmp_path / "a.log") as a, gunicorn(env, tmp_path / "b.log") as b:
        results = await burst([a, b], key, 40)
        for url in (a, b):
            assert sum(r.status_code == 200 for u, r in results if u == url) == 10
            r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=bearer(fenced))
            assert_openai_error(r, 403, code="ip_not_allowed")


async def test_gunicorn_does_not_trust_forwarded_for_without_trusted_proxies(tmp_path, sqlite_url):
    env = base_env(tmp_path, sqlite_url)  # TRUSTED_PROXIES and FORWARDED_ALLOW_IPS unset
    fenced = cli_key(sqlite_url, "--allow-ip", "10.0.0.0/8")
    with gunicorn(env, tmp_path / "a.log") as url:
        headers = {**bearer(fenced), "X-Forwarded-For": "10.1.2.3"}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers=headers)
    assert_openai_error(r, 403, code="ip_not_allowed")
