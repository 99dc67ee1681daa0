"""The console in a real browser: headless Debian Chromium driven by tests/console/drive.mjs.

Requests made with the openai SDK show up in the overview's charts, the request log (filtered, one request
opened with its messages) and the conversations; a key created in the console works with the SDK and, once
disabled in the console, gets a 401; a backend whose upstream answered 429 shows as cooling down. Every page
is screenshotted (UI_SCREENSHOT_DIR keeps them). Needs `bash tests/ui/install.sh` (else skipped).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pytest_httpserver import HTTPServer

from llm_backend.config import ModelConfig
from llm_backend.db.migrate import upgrade
from tests.conftest import mock_model, openai_backend
from tests.ui.test_browser_chat import NODE, _missing, screenshot_path, wait_for

HERE = Path(__file__).resolve().parent
ADMIN = "browser-admin-key-41c2"
QUESTION = "What is the capital of Peru"
DRIVE_TIMEOUT = 420  # seconds; a phase takes a few (the deadline is for a machine under load)

pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def drive(phase: str, plan: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    plan_file = tmp_path / f"plan-{phase}.json"
    plan_file.write_text(json.dumps(plan))
    proc = subprocess.run(
        [NODE or "node", str(HERE / "drive.mjs"), phase, str(plan_file)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=DRIVE_TIMEOUT,
        check=False,
    )
    try:
        summary: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"drive.mjs {phase} printed no summary:\n{proc.stderr}\n{proc.stdout}") from None
    assert proc.returncode == 0 and summary["ok"], json.dumps(summary, indent=2)
    for shot in summary["shots"]:
        assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
    assert summary["console_errors"] == [] and summary["page_errors"] == [], summary
    assert summary["outside"] == [], "the console fetched something from elsewhere"
    return summary


def test_console_in_a_browser(serve: Callable[..., str], httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_json(
        {
            "error": {
                "message": "Rate limit reached",
                "type": "rate_limit_error",
                "code": "rate_limit_exceeded",
            }
        },
        status=429,
        headers={"Retry-After": "300"},
    )
    db_url = f"sqlite:///{tmp_path}/console.db"
    upgrade(db_url)
    flaky = ModelConfig(
        name="flaky", backends=(openai_backend(httpserver, name="flaky-upstream"),), retries=0
    )
    base = serve(
        [mock_model("mock"), flaky],
        auth="keys",
        admin_key=ADMIN,
        recording=True,
        database_url=db_url,
        data_dir=tmp_path,
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=base, timeout=30) as http:
        created = http.post("/admin/keys", json={"name": "team-a"}, headers=admin)
        assert created.status_code == 201, created.text
        team_key = created.json()["key"]
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=team_key, max_retries=0)
        for n in range(3):
            sdk.chat.completions.create(
                model="mock", messages=[{"role": "user", "content": f"{QUESTION} {n}?"}], user="ada"
            )
        stream = sdk.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "Stream me a story"}], user="bob", stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code in (429, 503)

        def recorded() -> bool:
            usage = http.get("/admin/usage?group_by=model", headers=admin).json()["data"]
            convs = http.get("/api/conversations", headers=admin).json()["data"]
            return sum(r["requests"] for r in usage) >= 5 and len(convs) >= 3

        wait_for(recorded, 60, "the requests to be recorded")

        shots = screenshot_path(tmp_path, "console")
        shots.mkdir(exist_ok=True)
        plan = {
            "base": base,
            "admin_key": ADMIN,
            "shots": str(shots),
            "question": QUESTION,
            "key_name": "made-in-console",
        }
        pages = drive("pages", plan, tmp_path)

        ov = pages["overview"]
        assert ov["charts"] >= 8, ov
        assert {"Requests", "Tokens", "Latency", "Time to first token (streams)"} <= set(
            ov["chart_titles"]
        ), ov
        assert ov["points"] > 0 and ov["request_bars"] > 0, ov
        assert int(ov["total_requests"].replace(",", "")) >= 5, ov
        assert "team-a" in ov["breakdown_text"] and "ada" in ov["breakdown_text"], ov
        assert "mock" in ov["breakdown_text"] and "flaky-upstream" in ov["breakdown_text"], ov
        assert ov["top_callers"] >= 1 and ov["after_7d"] == ov["total_requests"]
        assert ov["custom_fields_visible"] is True
        assert pages["phone"]["scroll"] <= pages["phone"]["width"] + 1, pages["phone"]
        assert pages["phone"]["charts"] == ov["charts"]

        assert pages["requests_all"] >= 5
        assert pages["requests_filtered_models"] == ["mock"] and pages["requests_filtered"] == 4, pages
        assert len(pages["requests_flaky"]) == 1 and "ok" not in pages["requests_flaky"][0], pages
        req = pages["request"]
        assert "mock" in req["record"] and "team-a" not in req["record"]  # the key shows as its id
        assert "ms in total" in req["timing"]
        assert any("You said" in m for m in req["messages"]), req

        assert pages["conversations_found"] >= 1
        roles = [m["role"] for m in pages["conversation"]]
        assert roles[:2] == ["user", "assistant"], pages["conversation"]
        assert QUESTION in pages["conversation"][0]["text"]
        assert pages["export_links"] == 2

        secret = pages["secret"]
        assert secret.startswith("sk-llmb-") and pages["copy_button"] == 1 and pages["copied_note"]
        assert not pages["secret_on_list"], "the key list must not show the secret again"
        assert any("made-in-console" in row and "active" in row for row in pages["keys_rows"])

        # the key made in the console works with the SDK, for the model it allows
        made = openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)
        reply = made.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hello"}])
        assert "You said" in (reply.choices[0].message.content or "")
        with pytest.raises(openai.APIStatusError):
            made.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "hello"}])

        second = drive("disable", plan, tmp_path)
        assert second["status_after"] == "disabled", second
        assert "made-in-console" in second["usage_before"]
        flaky_rows = [b for b in second["backends"] if b["backend"] == "flaky-upstream"]
        assert flaky_rows and flaky_rows[0]["state"] == "cooling_down", second["backends"]
        assert "cooling down" in flaky_rows[0]["text"] and "s left" in flaky_rows[0]["text"]
        assert [b["state"] for b in second["backends"] if b["backend"] == "mock-mock"] == ["healthy"]
        assert "/console/login" in second["after_sign_out"]

        # disabled in the console: the SDK now gets a 401
        with pytest.raises(openai.AuthenticationError) as denied:
            made.chat.completions.create(model="mock", messages=[{"role": "user", "content": "again"}])
        assert denied.value.status_code == 401
