"""Shared fixtures: Settings built in code, apps from create_app, a fake Azure OpenAI, a real-port server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from pytest_httpserver import HTTPServer

from llm_backend.app import create_app
from llm_backend.config import BackendConfig, ModelConfig, Settings

UPSTREAM_KEY = "upstream-secret-key"
DEPLOYMENT = "gpt-4o-prod"
API_VERSION = "2024-10-21"
AZURE_CHAT_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
AZURE_EMBEDDINGS_PATH = f"/openai/deployments/{DEPLOYMENT}/embeddings"
AZURE_COMPLETIONS_PATH = f"/openai/deployments/{DEPLOYMENT}/completions"
USER_MESSAGES = [{"role": "user", "content": "Say hello"}]


# -- building settings and apps ------------------------------------------------------------------------


def mock_model(name: str = "mock", *, aliases: tuple[str, ...] = (), delay_ms: float = 0.0) -> ModelConfig:
    return ModelConfig(
        name=name,
        aliases=aliases,
        backends=(BackendConfig(provider="mock", name=f"{name}-mock", delay_ms=delay_ms),),
    )


def azure_backend(httpserver: HTTPServer, **overrides: Any) -> BackendConfig:
    kw: dict[str, Any] = {
        "provider": "azure",
        "name": "eastus",
        "endpoint": httpserver.url_for("").rstrip("/"),
        "deployment": DEPLOYMENT,
        "api_version": API_VERSION,
        "api_key": UPSTREAM_KEY,
    }
    kw.update(overrides)
    return BackendConfig(**kw)


def openai_backend(httpserver: HTTPServer, **overrides: Any) -> BackendConfig:
    kw: dict[str, Any] = {
        "provider": "openai",
        "name": "oai",
        "base_url": httpserver.url_for("/v1"),
        "api_key": "k",
    }
    kw.update(overrides)
    return BackendConfig(**kw)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for one test: auth off, recording off, a tmp SQLite file; `models` defaults to the mock."""

    def make(models: tuple[ModelConfig, ...] | list[ModelConfig] | None = None, **kw: Any) -> Settings:
        kw.setdefault("auth", "none")
        kw.setdefault("recording", False)
        kw.setdefault("database_url", f"sqlite:///{tmp_path}/t.db")
        kw.setdefault("data_dir", tmp_path)
        kw.setdefault("log_level", "INFO")
        return Settings(models=tuple(models) if models is not None else (mock_model(),), **kw)

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Any]]:
    """A test client of a fresh app (lifespan running) for the given models/settings."""
    with contextlib.ExitStack() as stack:

        def make(models: Any = None, **kw: Any) -> Any:
            app = create_app(make_settings(models, **kw))
            return stack.enter_context(app.test_client())

        yield make


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    """A test client of an app serving the mock model (plus the alias gpt-3.5-turbo)."""
    return make_client([mock_model(aliases=("gpt-3.5-turbo",))])


@pytest.fixture
def azure_client(make_client: Callable[..., Any], httpserver: HTTPServer) -> Any:
    """A test client of an app whose model gpt-4o (alias gpt-4) is the Azure deployment played by httpserver."""
    return make_client(
        [ModelConfig(name="gpt-4o", aliases=("gpt-4",), backends=(azure_backend(httpserver),))]
    )


# -- pytest-httpserver: threaded, on 127.0.0.1 ----------------------------------------------------------


@pytest.fixture(scope="session")
def make_httpserver() -> Iterator[HTTPServer]:
    """pytest-httpserver's server, threaded (a slow handler must not block the next test) and on IPv4."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


# -- a real port -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def running_server(app: Any, **uvicorn_options: Any) -> Iterator[str]:
    """Serve `app` on a free port (uvicorn in a thread) and yield its base URL; leaving stops it, so its
    lifespan shutdown (the recorder's drain) has run when the block ends."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **uvicorn_options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


REPO = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def gunicorn_worker_pids(proc: subprocess.Popen[bytes]) -> list[str]:
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    return children.read_text().split() if children.exists() else []


@contextlib.contextmanager
def gunicorn_server(
    env: dict[str, str], log: Path, *, ready_path: str = "/readyz", timeout: float = 120, cwd: Path = REPO
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The app as users run it: gunicorn with gunicorn.conf.py on a free port, with exactly `env` as its
    environment (plus HOST and PORT), started in `cwd` (the checkout unless said otherwise).

    Yields the master process and the base URL once `ready_path` answers 200. On leaving, a master still
    running is stopped, and any worker it left behind is killed."""
    port = free_port()
    full_env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(GUNICORN), "-c", str(REPO / "gunicorn.conf.py"), "llm_backend.asgi:app"],
            cwd=cwd,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn did not answer {ready_path} on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            workers = gunicorn_worker_pids(proc)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def serve(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """Serve a fresh app on a real port (uvicorn in a thread); returns the base URL."""
    with contextlib.ExitStack() as stack:

        def start(models: Any = None, **kw: Any) -> str:
            return stack.enter_context(running_server(create_app(make_settings(models, **kw))))

        yield start


@pytest.fixture
def mock_url(serve: Callable[..., str]) -> str:
    """A real-port server for the mock model (aliases gpt-3.5-turbo and gpt-4o-mini)."""
    return serve([mock_model(aliases=("gpt-3.5-turbo", "gpt-4o-mini"))])


# -- helpers ---------------------------------------------------------------------------------------------


def assert_openai_error(
    response: Any, status: int, *, code: Any = ..., type_: Any = ..., param: Any = ...
) -> dict:
    """The response is `status` with {"error": {"message","type","param","code"}}; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "Traceback" not in response.text
    assert UPSTREAM_KEY not in response.text
    if code is not ...:
        assert error["code"] == code, error
    if type_ is not ...:
        assert error["type"] == type_, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def sse_payloads(raw: bytes) -> list[bytes]:
    """Split an SSE body framed exactly as OpenAI does (`data: ...\\n\\n` per event) into payloads."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].split(b"\n\n")
    out = []
    for event in events:
        assert event.startswith(b"data: "), event
        assert b"\n" not in event, event
        out.append(event[len(b"data: ") :])
    return out


def sse_json(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body; asserts it ends with exactly one `data: [DONE]`."""
    payloads = sse_payloads(raw)
    assert payloads[-1] == b"[DONE]", payloads[-3:]
    assert payloads.count(b"[DONE]") == 1
    return [orjson.loads(p) for p in payloads[:-1]]


def sse_body(*events: Any, done: bool = True) -> bytes:
    """An upstream SSE body: each event a dict (serialized compactly) or raw bytes."""
    parts = [b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events]
    if done:
        parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


# -- real-shaped Azure OpenAI answers ---------------------------------------------------------------------

_SAFE = {"filtered": False, "severity": "safe"}
CONTENT_FILTER_RESULTS = {
    "hate": _SAFE,
    "protected_material_code": {"filtered": False, "detected": False},
    "protected_material_text": {"filtered": False, "detected": False},
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
PROMPT_FILTER_RESULTS = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            "hate": _SAFE,
            "jailbreak": {"filtered": False, "detected": False},
            "self_harm": _SAFE,
            "sexual": _SAFE,
            "violence": _SAFE,
        },
    }
]
AZURE_USAGE = {
    "completion_tokens": 9,
    "completion_tokens_details": {
        "accepted_prediction_tokens": 0,
        "audio_tokens": 0,
        "reasoning_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
    "prompt_tokens": 10,
    "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
    "total_tokens": 19,
}


def azure_chat_completion(content: str = "Hello! How can I help you today?", **extra: Any) -> dict[str, Any]:
    return {
        "choices": [
            {
                "content_filter_results": CONTENT_FILTER_RESULTS,
                "finish_reason": "stop",
                "index": 0,
                "logprobs": None,
                "message": {"annotations": [], "content": content, "refusal": None, "role": "assistant"},
            }
        ],
        "created": 1739000000,
        "id": "chatcmpl-B0azureAbCdEfGhIjKlMnOpQrStUv",
        "model": "gpt-4o-2024-08-06",
        "object": "chat.completion",
        "prompt_filter_results": PROMPT_FILTER_RESULTS,
        "system_fingerprint": "fp_f3927aa00d",
        "usage": AZURE_USAGE,
        **extra,
    }


AZURE_FIRST_CHUNK = {
    "choices": [],
    "created": 0,
    "id": "",
    "model": "",
    "object": "",
    "prompt_filter_results": PROMPT_FILTER_RESULTS,
}


def _chunk(choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "choices": [choice],
        "created": 1739000000,
        "id": "chatcmpl-B0streamAbCdEfGhIjKlMnOpQr",
        "model": "gpt-4o-2024-08-06",
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp_f3927aa00d",
    }


def azure_stream_chunks(
    words: tuple[str, ...] = ("Hello", "!", " How", " can", " I", " help?"),
) -> list[dict]:
    """Azure's chunks: prompt-filter chunk, role chunk, content chunks, the finish chunk and the usage chunk."""
    chunks: list[dict[str, Any]] = [AZURE_FIRST_CHUNK]
    chunks.append(
        _chunk(
            {
                "content_filter_results": {},
                "delta": {"content": "", "refusal": None, "role": "assistant"},
                "finish_reason": None,
                "index": 0,
                "logprobs": None,
            }
        )
    )
    for w in words:
        chunks.append(
            _chunk(
                {
                    "content_filter_results": CONTENT_FILTER_RESULTS,
                    "delta": {"content": w},
                    "finish_reason": None,
                    "index": 0,
                    "logprobs": None,
                }
            )
        )
    chunks.append(
        _chunk(
            {"content_filter_results": {}, "delta": {}, "finish_reason": "stop", "index": 0, "logprobs": None}
        )
    )
    usage_chunk = {**_chunk({}), "choices": [], "usage": AZURE_USAGE}
    chunks.append(usage_chunk)
    return chunks
