"""ConsoleSessions: issue, verify, expiry, sign-out for every worker, admin key changes, CSRF tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from llm_backend.db.migrate import upgrade
from llm_backend.db.session import make_engine
from llm_backend.services.sessions import ADMIN_KEY_METHOD, LOCAL_METHOD, ConsoleSessions, token_hash


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _altered(token: str) -> str:
    """The token with its last character changed (to another one, whatever it was)."""
    return token[:-1] + ("1" if token.endswith("0") else "0")


@pytest.fixture
def engine(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_admin_key_session_round_trip_and_sign_out(engine) -> None:
    clock = Clock()
    sessions = ConsoleSessions(engine, ttl_s=3600, admin_key="the-admin-key", clock=clock)
    assert sessions.sign_in_with_admin_key("sk-llmb-not-the-admin") is None
    assert sessions.sign_in_with_admin_key("") is None
    token, session = sessions.sign_in_with_admin_key("the-admin-key", client_ip="127.0.0.1")  # type: ignore[misc]
    assert session.subject == "admin" and session.method == ADMIN_KEY_METHOD
    assert session.expires_at == clock.now + timedelta(hours=1)
    # another worker (another instance over the same database) sees the session
    other = ConsoleSessions(engine, ttl_s=3600, admin_key="the-admin-key", clock=clock)
    seen = other.verify(token)
    assert seen is not None and seen.csrf_token == session.csrf_token
    assert other.csrf_valid(seen, session.csrf_token)
    assert not other.csrf_valid(seen, "") and not other.csrf_valid(seen, _altered(session.csrf_token))
    # the database holds the token's hash only, never the token or the CSRF token
    with engine.connect() as conn:
        rows = [tuple(str(v) for v in r) for r in conn.execute(sa.text("SELECT * FROM console_sessions"))]
    assert len(rows) == 1 and rows[0][0] == token_hash(token)
    assert not any(token in v or session.csrf_token in v or "the-admin-key" in v for v in rows[0])
    # signing out on one worker ends it on the other
    assert sessions.revoke(token) is True
    assert other.verify(token) is None
    assert sessions.revoke(token) is False


def test_expiry_key_change_and_garbage(engine) -> None:
    clock = Clock()
    sessions = ConsoleSessions(engine, ttl_s=600, admin_key="k1", clock=clock)
    token, _ = sessions.issue("admin", method=ADMIN_KEY_METHOD)
    clock.now += timedelta(seconds=599)
    assert sessions.verify(token) is not None
    clock.now += timedelta(seconds=1)
    assert sessions.verify(token) is None
    assert sessions.prune() == 1
    token, _ = sessions.issue("admin", method=ADMIN_KEY_METHOD)
    assert ConsoleSessions(engine, admin_key="k2", clock=clock).verify(token) is None
    assert ConsoleSessions(engine, admin_key=None, clock=clock).verify(token) is None
    for junk in (None, "", "x", "a" * 10_000, token + "x"):
        assert sessions.verify(junk) is None


def test_local_sessions_only_while_the_console_is_open(engine) -> None:
    open_console = ConsoleSessions(engine, allow_local=True)
    token, _ = open_console.issue("local", method=LOCAL_METHOD)
    assert open_console.verify(token) is not None
    assert ConsoleSessions(engine, allow_local=False, admin_key="k").verify(token) is None
    with pytest.raises(ValueError):
        ConsoleSessions(engine, allow_local=False).issue("local", method=LOCAL_METHOD)
    with pytest.raises(ValueError):
        ConsoleSessions(engine).issue("admin", method=ADMIN_KEY_METHOD)


def test_other_methods_and_revoke_subject(engine) -> None:
    sessions = ConsoleSessions(engine)
    a, _ = sessions.issue("user-1", method="oidc", name="Ada <ada@example.com>")
    b, _ = sessions.issue("user-1", method="oidc")
    c, _ = sessions.issue("user-2", method="oidc")
    seen = sessions.verify(a)
    assert seen is not None and seen.display_name == "Ada <ada@example.com>"
    assert sessions.active() == 3
    assert sessions.revoke_subject("user-1") == 2
    assert sessions.verify(a) is None and sessions.verify(b) is None and sessions.verify(c) is not None
