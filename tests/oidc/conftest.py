"""Fixtures of the OIDC tests: the test issuer, apps that accept its tokens, a clock for the key cache."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from llm_backend.app import create_app
from llm_backend.config import BackendConfig, ModelConfig, Settings
from llm_backend.db import migrate
from llm_backend.services import oidc as oidc_module
from tests.oidc.support import Issuer

ADMIN_KEY = "sk-llmb-admin-oidc-tests"
MODELS = (ModelConfig(name="m", backends=(BackendConfig(provider="mock", name="m-mock", delay_ms=1.0),)),)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The key cache's clock, moved by the test only."""
    fake = FakeClock()
    monkeypatch.setattr(oidc_module, "monotonic", fake)
    return fake


@pytest.fixture
def issuer(httpserver: HTTPServer) -> Issuer:
    return Issuer(httpserver)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/oidc.db"
    migrate.upgrade(url)
    return url


@pytest.fixture
def make_settings(tmp_path: Path, db_url: str) -> Callable[..., Settings]:
    def make(oidc: Any = None, **kw: Any) -> Settings:
        kw.setdefault("models", MODELS)
        kw.setdefault("auth", "keys")
        kw.setdefault("admin_key", ADMIN_KEY)
        kw.setdefault("recording", True)
        kw.setdefault("recorder_journal", False)
        kw.setdefault("database_url", db_url)
        kw.setdefault("data_dir", tmp_path / "data")
        if oidc is not None:
            kw["oidc"] = oidc
        return Settings(**kw)

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Any]]:
    """make_client(oidc_settings, **settings) -> a test client (lifespan running) of a fresh app."""
    with contextlib.ExitStack() as stack:

        def make(oidc: Any = None, **kw: Any) -> Any:
            return stack.enter_context(create_app(make_settings(oidc, **kw)).test_client())

        yield make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}], "user": "body-user"}
