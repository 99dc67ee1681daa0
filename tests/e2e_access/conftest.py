"""Fixtures of the access-control and throttling end-to-end tests: apps with auth on, real ports, Redis."""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from llm_backend.app import create_app
from llm_backend.config import BackendConfig, ModelConfig, Settings
from llm_backend.db import migrate
from llm_backend.db.session import make_engine
from tests.conftest import free_port
from tests.conftest import running_server as shared_running_server
from tests.conftest_db import db_url, pg_migrated_url

__all__ = ["db_url", "pg_migrated_url"]

ADMIN_KEY = "adm-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL") or None
NO_REDIS = "TEST_REDIS_URL is not set: the Redis variant needs a Redis (e.g. redis://127.0.0.1:6379/14)"
#: RedisLimiter's default key prefix (the app does not make it configurable); keys are llmb:rl:{<key id>}:s|p
REDIS_PREFIX = "llmb:rl:"
KEY_FORMAT = re.compile(r"^sk-llmb-[A-Za-z0-9_-]{43,}$")
MESSAGES = [{"role": "user", "content": "Say hello"}]
REPO = Path(__file__).resolve().parents[2]
CLI = REPO / ".venv" / "bin" / "llm-backend"

#: Every key id the tests created; the Redis state of these keys is deleted after each test.
_created_key_ids: list[str] = []


def mock_model(name: str = "m", *, delay_ms: float = 0.0, aliases: tuple[str, ...] = ()) -> ModelConfig:
    return ModelConfig(
        name=name,
        aliases=aliases,
        backends=(BackendConfig(provider="mock", name=f"{name}-mock", delay_ms=delay_ms),),
    )


#: Two models: keys restricted to "m" must not see or use "other".
MODELS = (mock_model("m"), mock_model("other"))


def chat(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- databases --------------------------------------------------------------------------------------------


def migrated_sqlite(path: Path) -> str:
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    return url


def table_rows(db_url: str, table: str) -> list[dict[str, Any]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {table}"))]
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A tmp SQLite file migrated to head."""
    return migrated_sqlite(tmp_path / "access.db")


# -- Redis ------------------------------------------------------------------------------------------------


def redis_or_skip() -> str:
    if not TEST_REDIS_URL:
        pytest.skip(NO_REDIS)
    return TEST_REDIS_URL


def remember_key(key_id: str) -> None:
    _created_key_ids.append(key_id)


@pytest.fixture(autouse=True)
def _clean_redis_state() -> Iterator[None]:
    """After each test, delete the limiter state of the keys it created (only those keys, nothing else)."""
    _created_key_ids.clear()
    yield
    ids = list(_created_key_ids)
    _created_key_ids.clear()
    if not TEST_REDIS_URL or not ids:
        return
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
    try:
        for key_id in ids:
            names = list(client.scan_iter(match=f"{REDIS_PREFIX}{{{key_id}}}*"))
            if names:
                client.delete(*names)
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _patient_redis_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's Redis limiter waits for Redis as long as a loaded machine needs: with the production timeout
    (1 s) a slow answer fails open and lets requests through unchecked, which a limits test would count."""
    from llm_backend.services import access

    real = access.make_limiter

    def make_limiter(redis_url: str | None, *, fail_open: bool, **options: Any) -> Any:
        if redis_url:
            options.setdefault("timeout_s", 30.0)
            options.setdefault("pool_timeout_s", 60.0)
        return real(redis_url, fail_open=fail_open, **options)

    monkeypatch.setattr(access, "make_limiter", make_limiter)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def limiter_redis_url(request: pytest.FixtureRequest) -> str | None:
    """The limiter under test: None for the in-process limiter, TEST_REDIS_URL for the Redis one."""
    if request.param == "memory":
        return None
    return redis_or_skip()


# -- apps and servers -------------------------------------------------------------------------------------


def make_settings(database_url: str, data_dir: Path, **kw: Any) -> Settings:
    kw.setdefault("models", MODELS)
    kw.setdefault("auth", "keys")
    kw.setdefault("admin_key", ADMIN_KEY)
    kw.setdefault("recording", False)
    kw.setdefault("log_level", "INFO")
    kw["models"] = tuple(kw["models"])
    return Settings(database_url=database_url, data_dir=data_dir, **kw)


@pytest.fixture
def make_app(tmp_path: Path, sqlite_url: str) -> Callable[..., Any]:
    """create_app(Settings(...)) with auth on, the admin key, the mock models and the tmp SQLite database."""

    def make(database_url: str | None = None, **kw: Any) -> Any:
        return create_app(make_settings(database_url or sqlite_url, tmp_path / "data", **kw))

    return make


def closed_port_url() -> str:
    """A URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """The shared real-port server, with uvicorn's own X-Forwarded-For handling off, so the app's
    TRUSTED_PROXIES logic is what is tested (test_processes.py checks what gunicorn's configuration does)."""
    with shared_running_server(app, backlog=4096, proxy_headers=False) as url:
        yield url


@pytest.fixture
def serve(make_app: Callable[..., Any]) -> Iterator[Callable[..., str]]:
    """serve(**settings) -> base URL of a fresh app on a real port; stopped (recorder drained) at the end.

    serve.stop(url) stops one server early, e.g. to read what its recorder wrote."""
    with contextlib.ExitStack() as stack:
        stacks: dict[str, contextlib.ExitStack] = {}

        def start(**kw: Any) -> str:
            own = stack.enter_context(contextlib.ExitStack())
            url = own.enter_context(running_server(make_app(**kw)))
            stacks[url] = own
            return url

        def stop(url: str) -> None:
            stacks.pop(url).close()

        start.stop = stop  # type: ignore[attr-defined]
        yield start


@pytest.fixture
def http() -> Iterator[Callable[[str], httpx.Client]]:
    """http(base_url) -> a synchronous httpx client, closed at the end."""
    with contextlib.ExitStack() as stack:

        def make(base_url: str) -> httpx.Client:
            return stack.enter_context(httpx.Client(base_url=base_url, timeout=30))

        yield make


# -- keys -------------------------------------------------------------------------------------------------


def create_key(client: Any, name: str = "team-a", **fields: Any) -> dict[str, Any]:
    """POST /admin/keys with the admin key; returns the answer (with the secret in `key`)."""
    r = client.post("/admin/keys", json={"name": name, **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    info = r.json()
    remember_key(info["id"])
    return info


# -- checks -----------------------------------------------------------------------------------------------


def assert_openai_error(response: Any, status: int, *, code: Any = ..., type_: Any = ...) -> dict[str, Any]:
    """The answer is `status` with OpenAI's {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "Traceback" not in response.text
    if code is not ...:
        assert error["code"] == code, error
    if type_ is not ...:
        assert error["type"] == type_, error
    return error


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_go_duration(text: str) -> float:
    """Seconds of OpenAI's x-ratelimit-reset-* value ("20ms", "1s", "8.64s", "6m0s", "1h2m3s")."""
    parts = _DURATION_PART.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go-style duration: {text!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


RATE_HEADERS = ("limit", "remaining", "reset")


def rate_headers(response: Any, kind: str) -> tuple[int, int, float]:
    """(limit, remaining, reset seconds) of the x-ratelimit-*-<kind> headers; all three must be there."""
    h = response.headers
    for name in RATE_HEADERS:
        assert f"x-ratelimit-{name}-{kind}" in h, (kind, dict(h))
    limit = int(h[f"x-ratelimit-limit-{kind}"])
    remaining = int(h[f"x-ratelimit-remaining-{kind}"])
    reset = parse_go_duration(h[f"x-ratelimit-reset-{kind}"])
    assert 0 <= remaining <= limit
    assert reset >= 0
    return limit, remaining, reset


def retry_after(response: Any) -> int:
    value = response.headers.get("retry-after")
    assert value is not None and value.isdigit(), dict(response.headers)
    seconds = int(value)
    assert seconds >= 1
    return seconds


def ceil_s(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))
