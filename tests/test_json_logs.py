"""LOG_FORMAT=json through gunicorn as users run it: every line the server writes, on stdout and stderr, is
a JSON object — gunicorn's master and workers, uvicorn, the app, warnings, tracebacks, stray prints,
signals (HUP, TERM), a worker that cannot boot and configuration errors at start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llm_backend.db import migrate
from tests.conftest import GUNICORN, REPO, free_port

DEADLINE = 60.0

# Run in each worker after it loaded the app: output that bypasses logging, and a request that fails inside
# the app, so that the test sees what a misbehaving library or a bug would print.
HOOKS = """
exec(compile(open({conf!r}).read(), {conf!r}, "exec"))


def post_worker_init(worker):
    import sys
    import threading
    import warnings

    from llm_backend.upstream.mock import MockBackend

    reply = MockBackend._reply

    def exploding(self, prompt, index):
        if "explode" in prompt:
            raise RuntimeError("the mock exploded")
        return reply(self, prompt, index)

    MockBackend._reply = exploding
    warnings.warn("a library warning in the worker", UserWarning)
    print("a stray print on stdout")
    print("a stray line on stderr", file=sys.stderr, flush=True)
    threading.Thread(target=lambda: 1 / 0, name="doomed").start()
"""

MODELS = """
models:
  - name: mock
    backends:
      - provider: mock
        delay_ms: 0
  - name: down
    retries: 0
    backends:
      - provider: openai
        base_url: http://127.0.0.1:{closed}/v1
        api_key: k
        timeout: {{connect: 2, first_byte: 5, total: 10}}
"""


def wait_for(condition: Callable[[], Any], what: str, proc: subprocess.Popen[bytes], logs: Path) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None and not condition():
            break
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen; output:\n{read_output(logs)[-4000:]}")


def read_output(logs: Path) -> str:
    return "".join(p.read_text() for p in (logs / "stdout", logs / "stderr") if p.exists())


def json_records(logs: Path) -> list[dict[str, Any]]:
    """Every line of stdout and stderr as a JSON object; fails naming the first line that is not one."""
    records = []
    for name in ("stdout", "stderr"):
        for number, line in enumerate((logs / name).read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"{name} line {number} is not JSON: {line!r}")
            assert isinstance(record, dict), line
            assert {"time", "level", "logger", "message"} <= record.keys(), line
            record["_stream"] = name
            records.append(record)
    return records


def start_gunicorn(env: dict[str, str], logs: Path, conf: Path, app: str = "llm_backend.asgi:app") -> Any:
    logs.mkdir(exist_ok=True)
    with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
        return subprocess.Popen(
            [str(GUNICORN), "-c", str(conf), app], cwd=REPO, env=env, stdout=out, stderr=err
        )


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "LLM_BACKEND_AUTH": "none",
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "2",
        **extra,
    }


def messages_of(records: list[dict[str, Any]]) -> list[str]:
    return [str(r["message"]) for r in records]


def test_every_line_is_json_through_requests_reload_and_shutdown(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'llmb.db'}"
    migrate.upgrade(db)
    config = tmp_path / "models.yaml"
    config.write_text(MODELS.format(closed=free_port()))
    conf = tmp_path / "gunicorn_hooks.conf.py"
    conf.write_text(HOOKS.format(conf=str(REPO / "gunicorn.conf.py")))
    env = base_env(tmp_path, LLM_BACKEND_CONFIG=str(config), DATABASE_URL=db)
    url = f"http://127.0.0.1:{env['PORT']}"
    logs = tmp_path / "logs"
    proc = start_gunicorn(env, logs, conf)

    def ready() -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "readiness", proc, logs)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        answer = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        stream = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "stream"}], stream=True
        )
        assert any(chunk.choices for chunk in stream)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.APIStatusError) as upstream_down:
            client.chat.completions.create(model="down", messages=[{"role": "user", "content": "x"}])
        assert upstream_down.value.status_code >= 500
        with pytest.raises(openai.APIStatusError) as exploded:
            client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "explode"}])
        assert exploded.value.status_code == 500
        assert httpx.get(url + "/nope", timeout=10).status_code == 404
        bad = httpx.post(
            url + "/v1/chat/completions", content=b"{bad", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400

        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: read_output(logs).count("Booting worker") >= 4, "the reload", proc, logs)
        wait_for(ready, "readiness after the reload", proc, logs)
        assert client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "again"}])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise
    assert code == 0, read_output(logs)[-3000:]

    records = json_records(logs)
    messages = messages_of(records)
    text = "\n".join(messages)
    for expected in (
        "Starting gunicorn",
        "Booting worker with pid",
        "Application startup complete",
        "Handling signal: hup",
        "Handling signal: term",
        "Shutting down: Master",
        "refused a request before authentication (no such route)",  # junk is summed up, not a line each
        "POST /v1/chat/completions 200",
        "POST /v1/chat/completions 404",
        "POST /v1/chat/completions 400",
        "POST /v1/chat/completions 500",
    ):
        assert expected in text, f"{expected!r} not logged:\n{text[-3000:]}"
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "uvicorn.error", "llm_backend.access"} <= loggers, loggers
    # output that bypassed logging in the workers: still one JSON record a line
    assert any(r["logger"] == "py.warnings" and "a library warning" in r["message"] for r in records)
    assert any(r["logger"] == "stdout" and r["message"] == "a stray print on stdout" for r in records)
    assert any(r["logger"] == "stderr" and r["message"] == "a stray line on stderr" for r in records)
    uncaught = [r for r in records if "doomed" in r["message"]]
    assert uncaught and "ZeroDivisionError" in uncaught[0]["exception"], uncaught
    tracebacks = [r for r in records if "the mock exploded" in str(r.get("exception", ""))]
    assert tracebacks and tracebacks[0]["level"] == "error", messages[-40:]
    assert {r["pid"] for r in records if r["logger"] == "gunicorn.error"} >= {proc.pid}
    assert "Traceback" not in (logs / "stdout").read_text() + "".join(
        line for line in (logs / "stderr").read_text().splitlines() if not line.startswith("{")
    )


def test_a_worker_that_cannot_boot_is_reported_in_json(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(MODELS.format(closed=free_port()))
    env = base_env(tmp_path, LLM_BACKEND_CONFIG=str(config), WEB_CONCURRENCY="1")
    logs = tmp_path / "logs"
    proc = start_gunicorn(env, logs, REPO / "gunicorn.conf.py", app="llm_backend.no_such_module:app")
    code = proc.wait(timeout=DEADLINE)
    assert code != 0
    records = json_records(logs)
    failed = [r for r in records if r["message"] == "Exception in worker process"]
    assert failed and "ModuleNotFoundError" in failed[0]["exception"]
    assert "Reason: Worker failed to boot." in messages_of(records)
    assert any("No module named 'llm_backend.no_such_module'" in m for m in messages_of(records))


BAD_MODELS = textwrap.dedent(
    """
    models:
      - name: gpt-4o
        backend: [{provider: mock}]
      - name: other
        strategy: fastest
        backends:
          - provider: azur
    """
)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_every_configuration_error_stops_start_up_one_line_each(tmp_path: Path, log_format: str) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(BAD_MODELS)
    env = base_env(tmp_path, LLM_BACKEND_CONFIG=str(config), LOG_FORMAT=log_format)
    logs = tmp_path / "logs"
    proc = start_gunicorn(env, logs, REPO / "gunicorn.conf.py")
    assert proc.wait(timeout=DEADLINE) == 2
    expected = [
        f"{config}: models[0] (gpt-4o).backend: unknown key; did you mean 'backends'?",
        f"{config}: models[1] (other).strategy: 'fastest' is unknown",
        f"{config}: models[1] (other).backends[0].provider: 'azur' is not a provider; did you mean 'azure'?",
    ]
    if log_format == "json":
        problems = [r["message"] for r in json_records(logs) if r.get("event") == "configuration_error"]
    else:
        stderr = (logs / "stderr").read_text()
        assert "Traceback" not in stderr
        prefix = "llm-backend: configuration error: "
        problems = [line.removeprefix(prefix) for line in stderr.splitlines() if line.startswith(prefix)]
        assert "llm-backend: 3 configuration errors" in stderr
    assert len(problems) == 3, problems
    for want, got in zip(expected, problems, strict=True):
        assert got.startswith(want), (want, got)
