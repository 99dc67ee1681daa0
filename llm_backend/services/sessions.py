"""Console sessions: a signed-in operator's session, kept in the database so every worker and replica sees it.

Why a table and not a signed stateless cookie: signing out must end the session everywhere at once (a copied
cookie of a signed-out session must stop working), and so must changing the admin key; a stateless cookie
can only do that with a revocation list shared between workers, which is a table again. One indexed look-up
per console page is nothing next to the queries the page runs anyway.

The cookie carries a random token (32 bytes); the table holds only its sha256, so reading the database gives
no usable session. The CSRF token of a session is derived from the cookie's token (an HMAC), so it is not
stored either and a database reader cannot forge one.

Any sign-in method issues sessions here: `issue(subject, method=...)` returns the token for the cookie
(`SESSION_COOKIE`, set by llm_backend.api.console.set_session_cookie). Sessions opened with the admin key
remember a fingerprint of it and end when the key changes; sessions of the open loopback console (method
`local`) end when the console stops being open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from llm_backend.db.console_sessions import ConsoleSessionRepository
from llm_backend.db.session import session_scope

logger = logging.getLogger(__name__)

SESSION_COOKIE = "llmb_console"
DEFAULT_TTL_S = 12 * 3600.0
ADMIN_KEY_METHOD = "admin_key"
LOCAL_METHOD = "local"
ADMIN_SUBJECT = "admin"
_TOKEN_BYTES = 32
_MAX_TOKEN_CHARS = 256  # a longer cookie value is not one of ours: refused without hashing it


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """A valid session as the pages need it; `csrf_token` goes into every state-changing form."""

    subject: str
    method: str
    name: str | None
    created_at: datetime
    expires_at: datetime
    csrf_token: str

    @property
    def display_name(self) -> str:
        return self.name or self.subject


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_token_for(token: str) -> str:
    """The CSRF token of the session whose cookie holds `token` (not stored anywhere)."""
    return hmac.new(token.encode("utf-8"), b"llm-backend console csrf", hashlib.sha256).hexdigest()


def credential_fingerprint(secret: str) -> str:
    """What a session remembers of the admin key it was opened with: enough to notice a change, not the key
    (an HMAC keyed by the key itself, truncated)."""
    return hmac.new(secret.encode("utf-8"), b"llm-backend console session", hashlib.sha256).hexdigest()[:32]


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


class ConsoleSessions:
    """Issues, verifies and ends console sessions (blocking calls: run them in a thread from async code).

    `admin_key`: the current LLM_BACKEND_ADMIN_KEY (None: no admin-key sessions are valid).
    `allow_local`: whether sessions of the open loopback console (LLM_BACKEND_AUTH=none, no admin key) are
    valid. `clock` returns the current aware UTC time (tests inject one).
    """

    def __init__(
        self,
        engine: Any,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        admin_key: str | None = None,
        allow_local: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.ttl = timedelta(seconds=ttl_s)
        self._admin_fingerprint = credential_fingerprint(admin_key) if admin_key else None
        self._admin_key = admin_key
        self.allow_local = allow_local
        self.clock = clock

    # -- issuing ------------------------------------------------------------------------------------------

    def issue(
        self,
        subject: str,
        *,
        method: str,
        name: str | None = None,
        client_ip: str | None = None,
        ttl_s: float | None = None,
    ) -> tuple[str, ConsoleSession]:
        """A new session for `subject` signed in by `method`; returns (cookie token, session)."""
        now = self.clock()
        expires = now + (timedelta(seconds=ttl_s) if ttl_s is not None else self.ttl)
        credential = self._expected_credential(method)
        if method in (ADMIN_KEY_METHOD, LOCAL_METHOD) and credential is None:
            raise ValueError(f"sessions of method {method!r} cannot be issued with this configuration")
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        with session_scope(self.engine, write=True) as db:
            repo = ConsoleSessionRepository(db)
            repo.delete_expired(now)
            repo.create(
                id=token_hash(token),
                subject=subject[:255],
                method=method[:32],
                name=name[:255] if name else None,
                credential=credential,
                client_ip=client_ip[:64] if client_ip else None,
                created_at=now,
                expires_at=expires,
            )
        logger.info("console session opened for %s (%s)", subject, method)
        return token, ConsoleSession(subject, method, name, now, expires, csrf_token_for(token))

    def admin_key_matches(self, presented: str) -> bool:
        """Whether `presented` is the admin key (constant time); False when no admin key is set."""
        if not self._admin_key or not presented:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self._admin_key.encode("utf-8"))

    def sign_in_with_admin_key(
        self, presented: str, *, client_ip: str | None = None
    ) -> tuple[str, ConsoleSession] | None:
        """A session for the admin if `presented` is the admin key; None otherwise (a client key included)."""
        if not self.admin_key_matches(presented):
            return None
        return self.issue(ADMIN_SUBJECT, method=ADMIN_KEY_METHOD, client_ip=client_ip)

    # -- checking -----------------------------------------------------------------------------------------

    def _expected_credential(self, method: str) -> str | None:
        if method == ADMIN_KEY_METHOD:
            return self._admin_fingerprint
        if method == LOCAL_METHOD:
            return LOCAL_METHOD if self.allow_local else None
        return None

    def verify(self, token: str | None) -> ConsoleSession | None:
        """The session the cookie's token opens, or None (unknown, expired, signed out, credential changed)."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = token_hash(token)
        now = self.clock()
        with session_scope(self.engine) as db:
            row = ConsoleSessionRepository(db).get(digest)
            if row is None:
                return None
            subject, method, name = row.subject, row.method, row.name
            created, expires, credential = _aware(row.created_at), _aware(row.expires_at), row.credential
        if expires <= now:
            return None
        if method in (ADMIN_KEY_METHOD, LOCAL_METHOD):
            expected = self._expected_credential(method)
            if expected is None or credential is None or not hmac.compare_digest(credential, expected):
                return None
        return ConsoleSession(subject, method, name, created, expires, csrf_token_for(token))

    @staticmethod
    def csrf_valid(session: ConsoleSession, presented: str | None) -> bool:
        """Whether a form's CSRF token is the session's (constant time)."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), session.csrf_token.encode("utf-8"))

    # -- ending -------------------------------------------------------------------------------------------

    def revoke(self, token: str | None) -> bool:
        """End the session of this token, for every worker at once; False if there was none."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return False
        with session_scope(self.engine, write=True) as db:
            return ConsoleSessionRepository(db).delete(token_hash(token))

    def revoke_subject(self, subject: str) -> int:
        """End every session of `subject` (a user removed or locked out); returns how many ended."""
        with session_scope(self.engine, write=True) as db:
            return ConsoleSessionRepository(db).delete_subject(subject)

    def prune(self) -> int:
        """Delete expired sessions; returns how many."""
        with session_scope(self.engine, write=True) as db:
            return ConsoleSessionRepository(db).delete_expired(self.clock())

    def active(self) -> int:
        with session_scope(self.engine) as db:
            return ConsoleSessionRepository(db).count_active(self.clock())
