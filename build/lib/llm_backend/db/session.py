"""Engine and session factories: URL normalisation, SQLite pragmas, PostgreSQL via psycopg 3, timeouts."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite:///./llm_backend.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE (take the write lock up
# front, so concurrent writers wait on busy_timeout instead of failing on a lock upgrade).
SQLITE_BEGIN_IMMEDIATE = "llmb_sqlite_begin_immediate"


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time (connect, pool or statement timeout,
    lost connection). Raised by session_scope in place of the driver's error; the message names no secret."""


#: Driver errors that mean "the database is not there right now", as opposed to a bad query or data.
_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    sa_exc.DisconnectionError,
)


_SQLITE_UNAVAILABLE = re.compile(r"locked|busy|unable to open|disk i/o|readonly", re.IGNORECASE)


def unavailable_error(exc: BaseException) -> DatabaseUnavailable | None:
    """The DatabaseUnavailable for a driver error that means an outage or a timeout; None for any other."""
    if isinstance(exc, DatabaseUnavailable):
        return exc
    if isinstance(exc, _UNAVAILABLE) or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated):
        orig = getattr(exc, "orig", None) or exc
        if type(orig).__module__.startswith("sqlite3") and not _SQLITE_UNAVAILABLE.search(str(orig)):
            return None  # sqlite3 raises OperationalError for a missing table too: a bug, not an outage
        # first line of the driver's message only: no SQL, no parameters
        detail = str(orig).strip().splitlines()[0][:200] if str(orig).strip() else type(orig).__name__
        return DatabaseUnavailable(f"{type(orig).__name__}: {detail}")
    return None


def normalize_url(url: str) -> str:
    """`postgres://` and `postgresql://` (and other PostgreSQL drivers' schemes) → `postgresql+psycopg://`."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def database_url(environ: dict[str, str] | None = None) -> str:
    """The configured database URL (`DATABASE_URL`), normalised; the local SQLite file by default."""
    env = os.environ if environ is None else environ
    return normalize_url(env.get("DATABASE_URL") or DEFAULT_DATABASE_URL)


def _setup_sqlite(engine: Engine, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (not the sqlite3 module) decide when transactions begin, so SAVEPOINTs work.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get(SQLITE_BEGIN_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


#: How much longer than the server's statement_timeout the client waits for an answer before it gives up on
#: the connection: the server cancels a slow statement itself; this catches a server that answers nothing.
CLIENT_DEADLINE_MARGIN_S = 1.0


@functools.lru_cache(maxsize=8)
def _deadline_connection_class(deadline_s: float) -> Any:
    """A psycopg Connection whose every wait for the server ends after `deadline_s` seconds.

    statement_timeout is enforced by the server, so a server that is stopped (SIGSTOP, a frozen VM, a
    network that drops packets) never sends the cancel and the client would wait forever (a pooled
    connection's pre-ping included). Past the deadline the connection is closed, so the pool discards it,
    and the call fails with OperationalError (DatabaseUnavailable out of session_scope)."""
    import psycopg

    wait_timeout = getattr(psycopg.errors, "_WaitTimeout", psycopg.OperationalError)

    class DeadlineConnection(psycopg.Connection):  # type: ignore[type-arg]
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            if timeout is not None:
                return super().wait(gen, interval, timeout)
            try:
                return super().wait(gen, interval, deadline_s)
            except wait_timeout:
                self.close()
                raise psycopg.OperationalError(
                    f"the database server did not answer within {deadline_s:g}s; connection closed"
                ) from None

    return DeadlineConnection


def make_engine(
    url: str | None = None,
    *,
    echo: bool = False,
    connect_timeout_s: float | None = None,
    statement_timeout_s: float | None = None,
    pool_timeout_s: float | None = None,
    **kwargs: Any,
) -> Engine:
    """A sync engine for `url` (default: `DATABASE_URL` or `sqlite:///./llm_backend.db`).

    SQLite gets WAL, a busy timeout, foreign keys and `check_same_thread=False` (the app uses the engine
    from worker threads); PostgreSQL gets psycopg 3, pre-ping and a connect timeout.

    Timeouts (None: the defaults above, no statement timeout): `connect_timeout_s` bounds opening a
    PostgreSQL connection; `statement_timeout_s` is PostgreSQL's statement_timeout (and lock_timeout) for
    every statement of the engine's sessions, and SQLite's busy timeout; `pool_timeout_s` bounds the wait
    for a pooled connection. The server serves with all three set (a request must not wait on a database
    that does not answer); migrations and the CLI use the defaults.
    """
    url = normalize_url(url) if url else database_url()
    parsed = make_url(url)
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    if pool_timeout_s is not None:
        kwargs.setdefault("pool_timeout", pool_timeout_s)
    if parsed.get_backend_name() == "sqlite":
        busy_ms = SQLITE_BUSY_TIMEOUT_MS if statement_timeout_s is None else int(statement_timeout_s * 1000)
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", busy_ms / 1000)
        if parsed.database in (None, "", ":memory:"):
            kwargs.setdefault("poolclass", StaticPool)
            kwargs.pop("pool_timeout", None)
        engine = sa.create_engine(url, echo=echo, connect_args=connect_args, **kwargs)
        _setup_sqlite(engine, busy_ms)
        return engine
    if parsed.get_backend_name() == "postgresql":
        # libpq takes whole seconds; psycopg applies it to the whole connection attempt
        connect = POSTGRES_CONNECT_TIMEOUT_S if connect_timeout_s is None else connect_timeout_s
        connect_args.setdefault("connect_timeout", max(1, round(connect)))
        kwargs.setdefault("pool_pre_ping", True)
        if statement_timeout_s is not None and statement_timeout_s > 0:
            ms = int(statement_timeout_s * 1000)
            options = f"-c statement_timeout={ms} -c lock_timeout={ms}"
            given = connect_args.get("options")
            connect_args["options"] = f"{given} {options}" if given else options
            if parsed.get_driver_name() == "psycopg":
                engine = sa.create_engine(url, echo=echo, connect_args=connect_args, **kwargs)
                cls = _deadline_connection_class(float(statement_timeout_s) + CLIENT_DEADLINE_MARGIN_S)

                @event.listens_for(engine, "do_connect")
                def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
                    return cls.connect(*cargs, **cparams)

                return engine
    return sa.create_engine(url, echo=echo, connect_args=connect_args, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to `engine`; objects stay usable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine, *, write: bool = False) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error.

    `write=True` for a transaction that writes: on SQLite it takes the write lock as it begins (BEGIN
    IMMEDIATE), so it waits its turn behind the recorder instead of failing with "database is locked" when
    it reads first and another writer commits before it writes; elsewhere it changes nothing.

    An unreachable database, a lost connection or a timeout comes out as DatabaseUnavailable (callers map
    it to their own terms: the API answers 503 with Retry-After); every other error passes unchanged."""
    try:
        bind = engine.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True}) if write else engine
        with Session(bind, expire_on_commit=False) as session, session.begin():
            yield session
    except sa_exc.SQLAlchemyError as exc:
        down = unavailable_error(exc)
        if down is None:
            raise
        raise down from exc
