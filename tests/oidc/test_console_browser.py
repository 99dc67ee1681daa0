"""The console's OIDC sign-in in headless Chromium: the browser follows the test issuer's redirects, the
session cookie (SameSite=Strict) must reach the console after the callback; a non-admin gets the refusal
page. Needs `bash tests/ui/install.sh` (Debian's chromium, playwright-core); skipped with the reason otherwise."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llm_backend.app import create_app
from tests.conftest import running_server
from tests.oidc.support import Issuer
from tests.oidc.test_console_login import ADMINS, console_settings
from tests.ui.test_browser_chat import NODE, _missing

DRIVER = Path(__file__).resolve().parent / "drive_login.mjs"
DRIVE_TIMEOUT = 300  # seconds; a run takes a few (the deadline is for a loaded machine)

pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def drive(url: str, expect: str, tmp_path: Path) -> dict[str, Any]:
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(DRIVER), url, expect, str(tmp_path / f"{expect}.png")],
        capture_output=True,
        text=True,
        timeout=DRIVE_TIMEOUT,
    )
    lines = done.stdout.strip().splitlines()
    summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    assert done.returncode == 0, (summary, done.stderr[-3000:])
    return summary


@pytest.mark.slow
def test_admin_signs_in_in_chromium(issuer: Issuer, make_settings: Any, tmp_path: Path) -> None:
    issuer.next_login = {"groups": [ADMINS]}
    with running_server(create_app(make_settings(console_settings(issuer)))) as url:
        summary = drive(url, "admin", tmp_path)
    assert summary["who"] == "Ada Lovelace"
    assert summary["visited"][:1] == ["/console/login"]
    assert "/console/keys" in summary["visited"]
    (exchange,) = issuer.token_requests
    assert exchange["code_verifier"]


@pytest.mark.slow
def test_non_admin_is_refused_in_chromium(issuer: Issuer, make_settings: Any, tmp_path: Path) -> None:
    issuer.next_login = {"groups": ["g-engineering"], "roles": []}
    with running_server(create_app(make_settings(console_settings(issuer)))) as url:
        summary = drive(url, "refused", tmp_path)
    assert "not an administrator" in summary["message"]
