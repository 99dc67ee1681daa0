"""A real browser against a real port: tests/ui/chat.html, driven in headless Debian Chromium by drive.mjs.

The page is served from another origin than the API (CORS preflights happen for real), sends the whole
history every turn the way ChatGPT-style UIs do and renders the SSE stream as it arrives. With recording
on, the two turns must land in one recorded conversation. `bash tests/ui/install.sh` installs what the test
needs (Debian's chromium, playwright-core from npm); without it the tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import ModelConfig
from llm_backend.db.migrate import upgrade
from tests.conftest import AZURE_CHAT_PATH, azure_backend, azure_stream_chunks, mock_model, sse_body

UI_DIR = Path(__file__).resolve().parent
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
NODE = shutil.which("node")
PLAYWRIGHT_CORE = UI_DIR / "node_modules" / "playwright-core"
DRIVE_TIMEOUT = 300  # seconds; a run takes about 2 (the deadline is for a machine under load)
ADMIN_KEY = "adm"
QUESTIONS = ["Hello there", "And a second question"]


def _missing() -> str | None:
    hint = "run `bash tests/ui/install.sh` (or `make ui-test`)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian's chromium package); {hint}"
    if NODE is None:
        return "node is not on PATH"
    if not PLAYWRIGHT_CORE.is_dir():
        return f"{PLAYWRIGHT_CORE.relative_to(UI_DIR.parent.parent)} is missing; {hint}"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on a free port of 127.0.0.1 (an origin of its own); returns its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Where the screenshot goes: tmp_path, or UI_SCREENSHOT_DIR when set (to keep it for a look)."""
    directory = Path(os.environ.get("UI_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


def run_drive(api_base: str, key: str, shot: Path) -> subprocess.CompletedProcess[str]:
    """Serve the page on its own origin and run drive.mjs against the API at `api_base`."""
    with static_server(UI_DIR) as page_origin:
        assert page_origin != api_base
        page_url = f"{page_origin}/chat.html?" + urlencode({"base": api_base, "key": key, "model": "mock"})
        proc = subprocess.run(
            [NODE or "node", str(UI_DIR / "drive.mjs"), page_url, str(shot)],
            cwd=UI_DIR,
            capture_output=True,
            text=True,
            timeout=DRIVE_TIMEOUT,
            check=False,
        )
    return proc


def drive(api_base: str, key: str, shot: Path) -> dict[str, Any]:
    """run_drive, which must succeed; returns drive.mjs's JSON summary."""
    proc = run_drive(api_base, key, shot)
    assert proc.returncode == 0, f"drive.mjs failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True, summary
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
    return summary


def assert_two_turns(summary: dict[str, Any]) -> None:
    assert "mock" in summary["models"], summary["models"]
    assert [t["question"] for t in summary["turns"]] == QUESTIONS
    for turn in summary["turns"]:
        assert f"You said: {turn['question']}" in turn["reply"], turn
        assert turn["chunks"] > 1, turn
    assert [m["role"] for m in summary["messages"]] == ["user", "assistant", "user", "assistant"]
    # every turn sent the whole history so far
    assert [r["messages"] for r in summary["requests"]] == [1, 3]
    assert summary["preflights"] >= 1
    assert summary["console_errors"] == [] and summary["page_errors"] == []


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_browser_chat_with_a_key_is_recorded_as_one_conversation(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path}/ui.db"
    upgrade(db_url)
    base = serve(
        [mock_model("mock", aliases=("gpt-4",), delay_ms=25)],
        auth="keys",
        admin_key=ADMIN_KEY,
        recording=True,
        database_url=db_url,
        data_dir=tmp_path,
    )
    with httpx.Client(base_url=base, timeout=10) as http:
        created = http.post(
            "/admin/keys", json={"name": "browser"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        auth = {"Authorization": f"Bearer {key}"}

        summary = drive(base, key, screenshot_path(tmp_path, "chat-keys.png"))
        assert_two_turns(summary)

        # the recorded side: both turns threaded into ONE conversation of 4 messages (written behind)
        def listed() -> list[dict[str, Any]] | None:
            r = http.get("/api/conversations", headers=auth)
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            return data if data and data[0]["message_count"] >= 4 else None

        convs = wait_for(listed, 60, "the recorded conversation")
        assert len(convs) == 1, convs
        assert convs[0]["message_count"] == 4, convs
        assert convs[0]["title"] == QUESTIONS[0]
        conv = http.get(f"/api/conversations/{convs[0]['id']}", headers=auth)
        assert conv.status_code == 200, conv.text
        recorded = [(m["role"], m["content"]) for m in conv.json()["messages"]]
        assert recorded == [(m["role"], m["content"]) for m in summary["messages"]]


def test_browser_chat_with_auth_off_accepts_any_key(serve: Callable[..., str], tmp_path: Path) -> None:
    base = serve([mock_model("mock", delay_ms=25)], auth="none")
    summary = drive(base, "sk-anything-goes", screenshot_path(tmp_path, "chat-open.png"))
    assert_two_turns(summary)


def test_browser_chat_through_an_azure_shaped_upstream(
    serve: Callable[..., str], httpserver: HTTPServer, tmp_path: Path
) -> None:
    """Azure streams a prompt-filter chunk and a usage chunk with empty `choices`: neither reaches the page."""

    def azure(request: Request) -> Response:
        question = orjson.loads(request.data)["messages"][-1]["content"]
        words = f"Sure. You said: {question}.".split(" ")
        chunks = azure_stream_chunks(tuple(w if i == 0 else " " + w for i, w in enumerate(words)))
        assert chunks[0]["choices"] == [] and chunks[-1]["choices"] == []

        def frames() -> Iterator[bytes]:
            for chunk in chunks:
                time.sleep(0.02)  # word by word, as Azure does: the page must render while it streams
                yield sse_body(chunk, done=False)
            yield b"data: [DONE]\n\n"

        return Response(frames(), content_type="text/event-stream")

    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_handler(azure)
    base = serve([ModelConfig(name="mock", backends=(azure_backend(httpserver),))], auth="none")
    summary = drive(base, "sk-anything", screenshot_path(tmp_path, "chat-azure.png"))
    assert_two_turns(summary)


def test_the_page_flags_chunks_without_choices_and_error_events(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    """The page's own checks are live: a bad stream from a fake API makes drive.mjs fail, saying why."""
    cors = {"Access-Control-Allow-Origin": "*"}
    preflight = {**cors, "Access-Control-Allow-Headers": "authorization, content-type"}
    models = {"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "test"}]}
    delta = {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}
    bad_stream = sse_body(
        {"object": "chat.completion.chunk", "choices": [delta]},
        {"object": "chat.completion.chunk", "choices": []},
        {"error": {"message": "the upstream broke off", "type": "server_error", "code": None}},
    )
    httpserver.expect_request("/v1/models", method="OPTIONS").respond_with_data("", headers=preflight)
    httpserver.expect_request("/v1/chat/completions", method="OPTIONS").respond_with_data(
        "", headers=preflight
    )
    httpserver.expect_request("/v1/models", method="GET").respond_with_json(models, headers=cors)
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_data(
        bad_stream, content_type="text/event-stream", headers=cors
    )
    shot = screenshot_path(tmp_path, "chat-bad-stream.png")
    proc = run_drive(httpserver.url_for("").rstrip("/"), "k", shot)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # both are shown in the page (#errors), which drive.mjs reports
    shown = next(line for line in proc.stderr.splitlines() if "the page shows errors" in line)
    assert "chunk without choices[0]" in shown, proc.stderr
    assert "error event: the upstream broke off" in shown, proc.stderr
    assert json.loads(proc.stdout)["ok"] is False
    assert shot.is_file()


def test_an_oversized_history_shows_the_gateways_413_message(
    serve: Callable[..., str], tmp_path: Path
) -> None:
    """A history past MAX_BODY_BYTES: the browser must be able to read the 413's message (CORS headers)."""
    base = serve([mock_model("mock", delay_ms=5)], auth="none", max_body_bytes=250)
    proc = run_drive(base, "k", screenshot_path(tmp_path, "chat-413.png"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    shown = next(line for line in proc.stderr.splitlines() if "the page shows errors" in line)
    assert "HTTP 413: The request body is larger than the limit of 250 bytes." in shown, proc.stderr
