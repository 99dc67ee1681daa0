"""The console's OIDC callback shares the sign-in throttle: refused sign-ins count like wrong admin keys,
and past the limit the callback answers 429 without looking at what the provider sent."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest

from llm_backend.services import signin_throttle
from tests.oidc.support import Issuer
from tests.oidc.test_console_login import ADMINS, console, console_settings, sign_in


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_refused_oidc_sign_ins_are_throttled(
    issuer: Issuer, make_settings: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    clock = Clock()
    monkeypatch.setattr(signin_throttle, "now", clock)
    with console(make_settings, console_settings(issuer)) as url:
        issuer.next_login = {"groups": ["g-engineering"], "roles": ["LLM.User"]}
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                client, answer = sign_in(url)
                with contextlib.closing(client):
                    assert answer.status_code == 403, answer.text
        refused = [r.getMessage() for r in caplog.records if "not an admin" in r.getMessage()]
        assert len(refused) == 5 and all("127.0.0.1" in m for m in refused)
        issuer.next_login = {"groups": [ADMINS], "roles": []}
        exchanges = len(issuer.token_requests)
        client, answer = sign_in(url)
        with contextlib.closing(client):
            assert answer.status_code == 429
            assert answer.headers["retry-after"] == "900"
            assert "text/html" in answer.headers["content-type"]
            assert "Too many failed sign-ins" in answer.text
            assert "llmb_console=" not in answer.headers.get("set-cookie", "")
        assert len(issuer.token_requests) == exchanges  # the code was not even exchanged
        clock.now += 900
        client, answer = sign_in(url)
        with contextlib.closing(client):
            assert answer.status_code == 200, answer.text
            assert "signed in" in answer.text.lower()
