"""Routing fixtures: two or three fake Azure regions (pytest-httpserver), apps built from code, Router units.

`east` is pytest-httpserver's own `httpserver`; `west` and `central` are extra threaded servers started once
per session and cleared after every test, so each test sees three empty regions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.app import create_app
from llm_backend.config import BackendConfig, BreakerConfig, ModelConfig, Settings
from llm_backend.upstream.base import Backend, UpstreamResponse, UpstreamStream
from llm_backend.upstream.router import Router
from tests.conftest import azure_chat_completion, azure_stream_chunks, sse_body

MODEL = "gpt-4o"
DEPLOYMENT = "d"
API_VERSION = "2024-10-21"
CHAT_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
ADMIN = {"Authorization": "Bearer adm"}
MESSAGES = [{"role": "user", "content": "Say hello"}]
SSE = "text/event-stream"


# -- the regions -------------------------------------------------------------------------------------------


def _start_server() -> HTTPServer:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    return server


@pytest.fixture(scope="session")
def _west_server() -> Iterator[HTTPServer]:
    server = _start_server()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture(scope="session")
def _central_server() -> Iterator[HTTPServer]:
    server = _start_server()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def east(httpserver: HTTPServer) -> HTTPServer:
    """The first region (pytest-httpserver's own server, cleared by its fixture)."""
    return httpserver


@pytest.fixture
def west(_west_server: HTTPServer) -> Iterator[HTTPServer]:
    """The second region."""
    _west_server.clear()
    yield _west_server
    _west_server.clear()


@pytest.fixture
def central(_central_server: HTTPServer) -> Iterator[HTTPServer]:
    """A third region."""
    _central_server.clear()
    yield _central_server
    _central_server.clear()


@pytest.fixture
def laggard() -> Iterator[HTTPServer]:
    """A region of its own for slow handlers: their late log entries must not leak into the next test.
    Requests held by `stall` are let go when the test ends."""
    server = _start_server()
    yield server
    for release in _releases.pop(id(server), []):
        release.set()
    server.clear()
    server.stop()


#: The release events of the handlers `stall` installed, per server.
_releases: dict[int, list[threading.Event]] = {}


def region(server: HTTPServer | str, name: str, **kw: Any) -> BackendConfig:
    """An Azure backend (deployment `d`) played by `server` (or at a URL, e.g. a closed port)."""
    endpoint = server if isinstance(server, str) else server.url_for("").rstrip("/")
    cfg: dict[str, Any] = {
        "provider": "azure",
        "name": name,
        "endpoint": endpoint,
        "deployment": DEPLOYMENT,
        "api_version": API_VERSION,
        "api_key": f"key-{name}",
    }
    cfg.update(kw)
    return BackendConfig(**cfg)


def model(*backends: BackendConfig, **kw: Any) -> ModelConfig:
    return ModelConfig(name=MODEL, backends=tuple(backends), **kw)


def quick_breaker(**kw: Any) -> BreakerConfig:
    kw.setdefault("failure_threshold", 3)
    kw.setdefault("cooldown", 1.0)
    kw.setdefault("failure_rate", None)
    return BreakerConfig(**kw)


# -- what the regions answer ---------------------------------------------------------------------------------


def reset(server: HTTPServer) -> None:
    """Forget the server's handlers (its request log stays)."""
    server.clear_all_handlers()


def answer(server: HTTPServer, text: str | None = None) -> None:
    """The region answers every chat request with a normal Azure completion naming it."""
    reset(server)
    server.expect_request(CHAT_PATH, method="POST").respond_with_json(
        azure_chat_completion(text or f"from {server.port}")
    )


def fail(
    server: HTTPServer, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> None:
    """The region answers every chat request with `status`."""
    reset(server)
    server.expect_request(CHAT_PATH, method="POST").respond_with_json(
        body if body is not None else {"error": {"code": str(status), "message": f"status {status}"}},
        status=status,
        headers=headers,
    )


def slow(server: HTTPServer, seconds: float, text: str = "slow") -> list[float]:
    """The region waits `seconds` before it answers; returns the list of arrival times it appends to
    (pytest-httpserver logs a request only once its handler has returned)."""
    reset(server)
    arrivals: list[float] = []

    def handler(request: Request) -> Response:
        arrivals.append(time.monotonic())
        time.sleep(seconds)
        return Response(orjson.dumps(azure_chat_completion(text)), content_type="application/json")

    server.expect_request(CHAT_PATH, method="POST").respond_with_handler(handler)
    return arrivals


def stall(server: HTTPServer, body: bytes, content_type: str) -> list[float]:
    """The region takes each request and answers (`body`) only when the test ends, or after a minute: a
    timeout shorter than that, not the region's answer, is what ends the attempt, however slow the machine.
    Returns the list of arrival times it appends to."""
    reset(server)
    arrivals: list[float] = []
    release = threading.Event()
    _releases.setdefault(id(server), []).append(release)

    def handler(request: Request) -> Response:
        arrivals.append(time.monotonic())
        release.wait(60)
        return Response(body, content_type=content_type)

    server.expect_request(CHAT_PATH, method="POST").respond_with_handler(handler)
    return arrivals


def stream_ok(server: HTTPServer) -> None:
    server.clear_all_handlers()
    server.expect_request(CHAT_PATH, method="POST").respond_with_data(
        sse_body(*azure_stream_chunks()), content_type=SSE
    )


def cut_stream(server: HTTPServer, n: int = 4) -> None:
    """A few chunks, then the connection breaks."""
    parts = [sse_body(c, done=False) for c in azure_stream_chunks()[:n]]

    def handler(request: Request) -> Response:
        def gen() -> Iterator[bytes]:
            for p in parts:
                yield p
                time.sleep(0.01)
            raise ConnectionError("the region went away")

        return Response(gen(), content_type=SSE)

    server.clear_all_handlers()
    server.expect_request(CHAT_PATH, method="POST").respond_with_handler(handler)


def hits(server: HTTPServer) -> int:
    """How many requests reached the region."""
    return len(server.log)


# -- time ----------------------------------------------------------------------------------------------------


class RouterClock:
    """The routers' clock (cool-downs, breaker windows), moved by hand: a test says when time passes, so a
    stalled machine cannot open or close a window behind its back."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def router_clock(monkeypatch: pytest.MonkeyPatch) -> RouterClock:
    """Every Router the app builds in this test runs on a RouterClock."""
    import llm_backend.lifespan

    clock = RouterClock()

    def make(*args: Any, **kw: Any) -> Router:
        kw.setdefault("clock", clock)
        return Router(*args, **kw)

    monkeypatch.setattr(llm_backend.lifespan, "Router", make)
    return clock


# -- apps ----------------------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(*models: ModelConfig, **kw: Any) -> Settings:
        kw.setdefault("auth", "none")
        kw.setdefault("admin_key", "adm")
        kw.setdefault("recording", False)
        kw.setdefault("database_url", f"sqlite:///{tmp_path}/t.db")
        kw.setdefault("data_dir", tmp_path)
        kw.setdefault("log_level", "WARNING")
        return Settings(models=models, **kw)

    return make


@pytest.fixture
def open_client(settings: Callable[..., Settings]) -> Iterator[Callable[..., Any]]:
    """open_client(model, ...) -> a test client of a fresh app (lifespan running until the test ends)."""
    with contextlib.ExitStack() as stack:

        def make(*models: ModelConfig, **kw: Any) -> Any:
            return stack.enter_context(create_app(settings(*models, **kw)).test_client())

        yield make


def chat(client: Any, **extra: Any) -> Any:
    body = {"model": MODEL, "messages": MESSAGES, **extra}
    return client.post(
        "/v1/chat/completions", content=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )


def content(response: Any) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def backends(client: Any) -> dict[str, dict[str, Any]]:
    """/admin/backends as {backend name: state}."""
    r = client.get("/admin/backends", headers=ADMIN)
    assert r.status_code == 200, r.text
    return {row["backend"]: row for row in r.json()["data"]}


# -- Router units ------------------------------------------------------------------------------------------


class FakeBackend(Backend):
    """A backend that is never called: Router unit tests only look at its config."""

    async def post(self, operation: str, body: bytes, *, model: str) -> UpstreamResponse:
        raise NotImplementedError

    async def open_stream(self, operation: str, body: bytes, *, model: str) -> UpstreamStream:
        raise NotImplementedError


def fake(name: str, **kw: Any) -> BackendConfig:
    return BackendConfig(provider="mock", name=name, **kw)


def make_router(cfg: ModelConfig, *, seed: int = 7, clock: Callable[[], float] | None = None) -> Router:
    import random

    kw: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return Router(
        [cfg], {f"{cfg.name}/{b.name}": FakeBackend(b) for b in cfg.backends}, rng=random.Random(seed), **kw
    )
