"""Console test helpers: an app with the database migrated, signing in, reading CSRF tokens from pages."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_backend.app import create_app
from llm_backend.config import Settings
from llm_backend.db.migrate import upgrade

ADMIN_KEY = "console-admin-key-8f3a1c"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def sign_in(client: Any, key: str = ADMIN_KEY) -> Any:
    """Sign in through the form as a browser would; returns the POST's response."""
    page = client.get("/console/login")
    assert page.status_code == 200, page.text
    return client.post(
        "/console/login",
        data={"csrf_token": csrf_of(page.text), "admin_key": key, "next": "/console/keys"},
        follow_redirects=False,
    )


@pytest.fixture
def console_client(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """A test client of a fresh app (migrated SQLite, admin key, keys on) with optional settings."""
    with contextlib.ExitStack() as stack:

        def make(models: Any = None, base_url: str = "http://testserver", **kw: Any) -> Any:
            url = f"sqlite:///{tmp_path}/console.db"
            upgrade(url)
            kw.setdefault("auth", "keys")
            kw.setdefault("admin_key", ADMIN_KEY)
            kw.setdefault("database_url", url)
            app = create_app(make_settings(models, **kw))
            return stack.enter_context(app.test_client(base_url=base_url))

        yield make
