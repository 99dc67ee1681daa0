"""Gateway variants the benchmark runs: (name, extra env, setup hook); add one by appending to VARIANTS."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass
class VariantContext:
    """What a setup hook may change before the gateway starts: its env and the client's headers."""

    name: str
    tmp: Path
    bin_dir: Path
    env: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)
    migrated: bool = False

    def cli(self, *args: str, timeout: float = 120) -> str:
        """Run ``llm-backend <args>`` with the variant's env; returns its stdout."""
        exe = self.bin_dir / "llm-backend"
        if not exe.exists():
            raise RuntimeError(f"{exe} not found: install the project (make install) or pass --no-migrate")
        proc = subprocess.run(
            [str(exe), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"llm-backend {' '.join(args)} failed: {(proc.stderr or proc.stdout)[-800:]}")
        return proc.stdout

    def migrate(self) -> None:
        """Migrate the variant's DATABASE_URL (once; the harness calls it if the hook did not)."""
        if not self.migrated:
            self.cli("migrate")
            self.migrated = True


SetupHook = Callable[[VariantContext], contextlib.AbstractContextManager[None]]


@dataclass(frozen=True)
class Variant:
    """One gateway configuration to benchmark."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    setup: SetupHook | None = None
    # Throughput is compared with this variant (issue 3: recording on within 10 % of recording off).
    baseline: str | None = None
    # Returns a reason to skip the variant (e.g. a missing database URL), or None to run it.
    skip: Callable[[], str | None] | None = None
    description: str = ""
    path: str = "/v1/chat/completions"  # the route measured (the body follows it)


def postgres_url() -> str | None:
    """The PostgreSQL server to create the benchmark database on, if one is configured."""
    return os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or None


def _libpq_url(url: str) -> str:
    """SQLAlchemy-style ``postgresql+psycopg://`` to a libpq URL."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@contextlib.contextmanager
def fresh_postgres(ctx: VariantContext) -> Iterator[None]:
    """Create ``llmb_bench_<rand>`` on the configured server, point DATABASE_URL at it, drop it after."""
    import psycopg  # only needed for this variant
    from psycopg import sql

    server = postgres_url()
    assert server is not None
    name = f"llmb_bench_{secrets.token_hex(4)}"
    admin = _libpq_url(_with_database(server, "postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        ctx.env["DATABASE_URL"] = _with_database(server, name)
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            try:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            except psycopg.Error:  # PostgreSQL < 13 has no FORCE
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@contextlib.contextmanager
def key_with_limits(ctx: VariantContext) -> Iterator[None]:
    """Key checking on, a key with limits far above what a run sends (so none trips), sent by the client."""
    ctx.migrate()
    out = ctx.cli(
        "keys",
        "create",
        "--name",
        "bench",
        "--rpm",
        "100000000",
        "--tpm",
        "2000000000",
        "--daily-tokens",
        "100000000000",
        "--max-parallel",
        "10000",
    )
    ctx.env["LLM_BACKEND_AUTH"] = "keys"
    ctx.headers["Authorization"] = f"Bearer {out.strip().splitlines()[-1]}"
    yield


def _no_postgres() -> str | None:
    return None if postgres_url() else "set BENCH_DATABASE_URL or TEST_DATABASE_URL to run it"


VARIANTS: list[Variant] = [
    Variant("recording-off", {"LLM_BACKEND_RECORDING": "false"}, description="no request recording"),
    Variant(
        "recording-sqlite",
        {"LLM_BACKEND_RECORDING": "true"},
        baseline="recording-off",
        description="recording on, SQLite (the default DATABASE_URL)",
    ),
    Variant(
        "recording-sqlite-nojournal",
        {"LLM_BACKEND_RECORDING": "true", "RECORDER_JOURNAL": "false"},
        baseline="recording-off",
        description="recording on, SQLite, without the per-request journal (its cost: recording-sqlite vs this)",
    ),
    Variant(
        "recording-sqlite-usage",
        {"LLM_BACKEND_RECORDING": "true", "RECORD_CONTENT": "false"},
        baseline="recording-off",
        description="recording on, SQLite, usage rows only (RECORD_CONTENT=false: no conversations)",
    ),
    Variant(
        "recording-postgres",
        {"LLM_BACKEND_RECORDING": "true"},
        setup=fresh_postgres,
        baseline="recording-off",
        skip=_no_postgres,
        description="recording on, a fresh PostgreSQL database",
    ),
    Variant(
        "auth-limits",
        {"LLM_BACKEND_RECORDING": "false"},
        setup=key_with_limits,
        baseline="recording-off",
        description="recording off, key checking on with RPM/TPM/parallel/daily limits (in-process limiter)",
    ),
    Variant(
        "responses",
        {"LLM_BACKEND_RECORDING": "false"},
        baseline="recording-off",
        description="recording off, the Responses API (POST /v1/responses, typed-event streams)",
        path="/v1/responses",
    ),
]
