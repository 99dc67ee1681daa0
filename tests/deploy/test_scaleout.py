"""Scale-out simulation: two gunicorn instances sharing PostgreSQL and Redis behind a round-robin front."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.deploy.support import ROOT

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (TEST_DATABASE_URL and TEST_REDIS_URL),
        reason="scale-out needs a shared PostgreSQL and Redis: set TEST_DATABASE_URL and TEST_REDIS_URL",
    ),
]

BIN = Path(sys.executable).parent
MODELS_YAML = """\
models:
  - {name: mock-gpt, backends: [{provider: mock, delay_ms: 5}]}
  - {name: mock-slow, backends: [{provider: mock, delay_ms: 100}]}
"""
ADMIN_KEY = "test-admin-" + secrets.token_urlsafe(16)
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
GRACEFUL_TIMEOUT = 30


def libpq_url(url: str, database: str | None = None) -> str:
    """A URL psycopg accepts (no SQLAlchemy driver suffix), optionally naming another database."""
    parts = urlsplit(url)
    scheme = "postgresql"
    path = f"/{database}" if database else parts.path
    return urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment))


@pytest.fixture(scope="module")
def models_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo config with only the mock provider."""
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(MODELS_YAML)
    return path


@pytest.fixture(scope="module")
def database_url(models_config: Path) -> Iterator[str]:
    """A fresh database on the test server, migrated by `llm-backend migrate`; dropped afterwards."""
    import psycopg

    name = "llmb_scaleout_" + secrets.token_hex(4)
    admin_url = libpq_url(TEST_DATABASE_URL)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = libpq_url(TEST_DATABASE_URL, name)
    try:
        result = subprocess.run(
            [str(BIN / "llm-backend"), "migrate"],
            env=os.environ | {"DATABASE_URL": url, "LLM_BACKEND_CONFIG": str(models_config)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"llm-backend migrate failed:\n{result.stdout}\n{result.stderr}"
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Instance:
    """One gunicorn master (WEB_CONCURRENCY=1) of llm-backend on its own port."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_instance(tmp: Path, name: str, env: dict[str, str]) -> Instance:
    port = free_port()
    data_dir = tmp / name
    data_dir.mkdir()
    log = tmp / f"{name}.log"
    process = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "llm_backend.asgi:app"],
        cwd=ROOT,
        env=os.environ
        | env
        | {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": "1",
            "GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT),
            "LLM_BACKEND_DATA_DIR": str(data_dir),
            "LOG_LEVEL": "info",
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Instance(port, process, log)


def wait_ready(instance: Instance, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert instance.process.poll() is None, f"instance on {instance.port} exited:\n{instance.logs()}"
        try:
            health = httpx.get(instance.url + "/healthz", timeout=2)
            ready = httpx.get(instance.url + "/readyz", timeout=2)
            if health.status_code == 200 and ready.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"instance on {instance.port} never became ready:\n{instance.logs()}")


def stop(instance: Instance) -> None:
    if instance.process.poll() is None:
        instance.process.send_signal(signal.SIGTERM)
        try:
            instance.process.wait(timeout=GRACEFUL_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            instance.process.kill()
            instance.process.wait()


@dataclass
class Front:
    """A tiny round-robin HTTP reverse proxy (aiohttp) on its own thread and event loop.

    Like a Service it sends new requests only to backends in rotation (`drain` takes one out, as the
    endpoints controller does when a pod starts terminating) and moves a request to the next backend only
    when the connection is refused (nothing was sent). It opens a new connection per request, counts the
    requests in flight per backend, and tags each response with the backend that answered (X-Backend-Port).
    """

    backends: list[int]
    port: int = field(default_factory=free_port)
    answered: Counter[int] = field(default_factory=Counter)
    in_flight: Counter[int] = field(default_factory=Counter)
    drained: set[int] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True).start()
        assert self._ready.wait(10), "the front proxy did not start"

    def drain(self, port: int) -> None:
        self.drained.add(port)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        turn = itertools.count()
        connector = aiohttp.TCPConnector(force_close=True)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:

            async def forward(request: web.Request) -> web.StreamResponse:
                body = await request.read()
                headers = {
                    k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
                }
                start = next(turn)
                rotation = [p for p in self.backends if p not in self.drained]
                for attempt in range(len(rotation)):
                    port = rotation[(start + attempt) % len(rotation)]
                    url = f"http://127.0.0.1:{port}{request.rel_url}"
                    self.in_flight[port] += 1
                    try:
                        try:
                            upstream = await session.request(request.method, url, headers=headers, data=body)
                        except aiohttp.ClientConnectorError:
                            continue  # refused: nothing reached that backend, try the next
                        async with upstream:
                            response = web.StreamResponse(status=upstream.status)
                            for key, value in upstream.headers.items():
                                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                                    response.headers[key] = value
                            response.headers["X-Backend-Port"] = str(port)
                            await response.prepare(request)
                            async for chunk in upstream.content.iter_any():
                                await response.write(chunk)
                            await response.write_eof()
                            if upstream.status == 200:
                                self.answered[port] += 1
                            return response
                    finally:
                        self.in_flight[port] -= 1
                return web.json_response({"error": {"message": "no backend reachable"}}, status=502)

            app = web.Application(client_max_size=16 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", forward)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()


@dataclass
class Cluster:
    instances: list[Instance]
    front: Front
    database_url: str


def start_cluster(tmp: Path, database_url: str, config: Path, auth: str) -> Iterator[Cluster]:
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": TEST_REDIS_URL,
        "LLM_BACKEND_CONFIG": str(config),
        "LLM_BACKEND_AUTH": auth,
        "LLM_BACKEND_ADMIN_KEY": ADMIN_KEY,
        "LLM_BACKEND_RECORDING": "true",
        "RECORD_CONTENT": "true",
    }
    instances = [start_instance(tmp, f"{auth}-{n}", env) for n in ("a", "b")]
    front = Front([i.port for i in instances])
    try:
        for instance in instances:
            wait_ready(instance)
        front.start()
        yield Cluster(instances, front, database_url)
    finally:
        front.close()
        for instance in instances:
            stop(instance)


@pytest.fixture(scope="module")
def open_cluster(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, models_config: Path
) -> Iterator[Cluster]:
    """Two instances with LLM_BACKEND_AUTH=none (the SIGTERM test, last to use it, stops one)."""
    yield from start_cluster(tmp_path_factory.mktemp("open"), database_url, models_config, "none")


@pytest.fixture(scope="module")
def keyed_cluster(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, models_config: Path
) -> Iterator[Cluster]:
    """Two instances with API keys on (LLM_BACKEND_AUTH=keys)."""
    yield from start_cluster(tmp_path_factory.mktemp("keys"), database_url, models_config, "keys")


def chat_rows(database_url: str, user: str) -> int:
    """Recorded chat completions answered 200 whose request carried `user` (each test tags its own)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            'SELECT count(*) FROM request_log WHERE route LIKE %s AND status_code = 200 AND "user" = %s',
            ("%/chat/completions", user),
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_for_rows(database_url: str, user: str, expected: int, timeout: float = 60.0) -> int:
    """Rows reach the database write-behind: wait until the count reaches `expected`, then once more."""
    deadline = time.monotonic() + timeout
    rows = chat_rows(database_url, user)
    while rows < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = chat_rows(database_url, user)
    time.sleep(0.5)  # anything past `expected` would be a duplicate: give it the time to show
    return chat_rows(database_url, user)


def test_both_instances_are_healthy_and_share_the_schema(open_cluster: Cluster) -> None:
    for instance in open_cluster.instances:
        assert httpx.get(instance.url + "/healthz", timeout=5).status_code == 200
        assert httpx.get(instance.url + "/readyz", timeout=5).status_code == 200
        models = httpx.get(instance.url + "/v1/models", timeout=5).json()
        assert "mock-gpt" in [m["id"] for m in models["data"]]
    assert httpx.get(open_cluster.front.url + "/healthz", timeout=5).status_code == 200


def test_chat_through_the_front_alternates_between_instances(open_cluster: Cluster) -> None:
    ports = []
    with httpx.Client(base_url=open_cluster.front.url, timeout=30) as client:
        for _ in range(6):
            response = client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"]
            ports.append(int(response.headers["X-Backend-Port"]))
    a, b = (i.port for i in open_cluster.instances)
    assert ports == [ports[0], ports[1]] * 3 and {ports[0], ports[1]} == {a, b}


async def test_sigterm_during_traffic_loses_no_request_record(open_cluster: Cluster) -> None:
    tag = "sigterm-" + secrets.token_hex(4)
    victim = open_cluster.instances[1]
    statuses: Counter[int] = Counter()
    stop_at = float("inf")  # traffic goes on until a while after the SIGTERM, however long that takes here
    total_limit = 400

    async def client_loop(client: httpx.AsyncClient, slow: bool) -> None:
        # Slow streams (100 ms a token) are the ones still running when SIGTERM arrives.
        payload = CHAT | {"user": tag} | ({"model": "mock-slow", "stream": True} if slow else {})
        while time.monotonic() < stop_at and sum(statuses.values()) < total_limit:
            response = await client.post("/v1/chat/completions", json=payload)
            statuses[response.status_code] += 1

    in_flight_at_sigterm = 0

    async def terminate_victim() -> None:
        # Kubernetes' order: out of the Service's rotation, the preStop pause, then SIGTERM while the
        # requests already sent to it are still being answered.
        nonlocal in_flight_at_sigterm, stop_at
        # until the victim has answered requests and is in the middle of others (a minute at most)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            open_cluster.front.answered[victim.port] > 0 and open_cluster.front.in_flight[victim.port] > 0
        ):
            await asyncio.sleep(0.05)
        open_cluster.front.drain(victim.port)
        await asyncio.sleep(0.3)  # the preStop pause, short: connections already sent are accepted
        in_flight_at_sigterm = open_cluster.front.in_flight[victim.port]
        victim.process.send_signal(signal.SIGTERM)
        stop_at = time.monotonic() + 5.0

    async with httpx.AsyncClient(base_url=open_cluster.front.url, timeout=60) as client:
        await asyncio.gather(terminate_victim(), *(client_loop(client, slow=n % 2 == 0) for n in range(8)))

    exit_code = await asyncio.to_thread(victim.process.wait, GRACEFUL_TIMEOUT + 10)
    assert exit_code == 0, f"the stopped instance exited with {exit_code}:\n{victim.logs()}"
    assert set(statuses) == {200}, f"requests failed around the SIGTERM: {statuses}"
    answered = statuses[200]
    assert open_cluster.front.answered[victim.port] > 0, "the stopped instance served nothing before SIGTERM"
    assert in_flight_at_sigterm > 0, "no request was in flight on the stopped instance at SIGTERM"
    rows = wait_for_rows(open_cluster.database_url, tag, answered)
    assert rows == answered, f"{answered} requests answered 200 but {rows} rows recorded"


# --- keys, limits and conversations across instances (issue 4 and the recording issue) -------------------


def create_key(base_url: str, **limits: Any) -> str:
    response = httpx.post(
        base_url + "/admin/keys",
        json={"name": "scaleout-" + secrets.token_hex(3)} | limits,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text
    key = response.json()["key"]
    assert key.startswith("sk-llmb-")
    return key


def test_rate_limit_holds_across_instances(keyed_cluster: Cluster) -> None:
    key = create_key(keyed_cluster.instances[0].url, rpm=5)
    statuses, ports = [], set()
    with httpx.Client(base_url=keyed_cluster.front.url, timeout=30) as client:
        for _ in range(12):
            response = client.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
            )
            statuses.append(response.status_code)
            ports.add(int(response.headers["X-Backend-Port"]))
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "rate_limit_exceeded"
                assert int(response.headers["Retry-After"]) >= 0
    assert ports == {i.port for i in keyed_cluster.instances}
    assert statuses.count(200) == 5 and statuses.count(429) == 7, statuses


def test_key_created_on_one_instance_works_on_the_other(keyed_cluster: Cluster) -> None:
    first, second = keyed_cluster.instances
    key = create_key(first.url)
    response = httpx.post(
        second.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    denied = httpx.post(second.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert denied.status_code == 401


def test_conversation_continues_and_lists_across_instances(keyed_cluster: Cluster) -> None:
    first, second = keyed_cluster.instances
    key = create_key(first.url)
    auth = {"Authorization": f"Bearer {key}"}
    created = httpx.post(
        first.url + "/api/conversations", json={"title": "scale-out"}, headers=auth, timeout=10
    )
    assert created.status_code in (200, 201), created.text
    conversation_id = created.json()["id"]
    for instance, text in ((first, "first turn"), (second, "second turn")):
        response = httpx.post(
            instance.url + "/v1/chat/completions",
            json=CHAT | {"messages": [{"role": "user", "content": text}]},
            headers=auth | {"X-Conversation-Id": conversation_id},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 60
    messages: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        listed = httpx.get(second.url + "/api/conversations", headers=auth, timeout=10)
        assert listed.status_code == 200, listed.text
        body = listed.json()
        items = body["data"] if isinstance(body, dict) else body
        assert conversation_id in [c["id"] for c in items]
        detail = httpx.get(f"{first.url}/api/conversations/{conversation_id}", headers=auth, timeout=10)
        assert detail.status_code == 200, detail.text
        messages = detail.json()["messages"]
        if len(messages) >= 4:
            break
        time.sleep(0.3)
    contents = [m.get("content") for m in messages]
    assert "first turn" in contents and "second turn" in contents, messages
    assert [m["role"] for m in messages].count("assistant") >= 2
