"""The demo as `make run` starts it: gunicorn with config/demo.yaml in a directory of its own (./llm_backend.db,
./data), migrated first with the `llm-backend` CLI; shared by the README and demo tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, gunicorn_server

VENV_BIN = Path(sys.executable).parent
CLI = VENV_BIN / "llm-backend"
DEMO_CONFIG = REPO / "config" / "demo.yaml"


@dataclass(frozen=True)
class Demo:
    url: str
    port: int
    cwd: Path  # where ./llm_backend.db lives, as for `make run` in a checkout
    env: dict[str, str]  # the environment the server got (a shell in `cwd` with it sees the same database)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`llm-backend …` in the demo's directory, as a user would type it there."""
        return subprocess.run(
            [str(CLI), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120
        )


def demo_env(**extra: str) -> dict[str, str]:
    """What `make run` sets (LLM_BACKEND_CONFIG, LLM_BACKEND_AUTH) over a clean environment; no DATABASE_URL,
    so the default ./llm_backend.db of the working directory is used, as in `make run`."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "LLM_BACKEND_CONFIG": str(DEMO_CONFIG),
        "LLM_BACKEND_AUTH": "none",
        "WEB_CONCURRENCY": "2",
        "MOCK_DELAY_MS": "2",  # the demo's own knob; streams need not take a second each here
    }
    env.update(extra)
    return env


@contextlib.contextmanager
def demo_server(cwd: Path, **extra_env: str) -> Iterator[Demo]:
    """Migrate ./llm_backend.db in `cwd` (`make migrate`) and serve the demo there (`make run`). `cwd` is laid
    out like a checkout after `make install`: ./.venv is this virtualenv (and ./.venv-clients the clients' one)."""
    env = demo_env(**extra_env)
    for venv in (VENV_BIN.parent, REPO / ".venv-clients"):
        if venv.is_dir() and not (cwd / venv.name).exists():
            (cwd / venv.name).symlink_to(venv)
    migrated = subprocess.run(
        [str(CLI), "migrate"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    with gunicorn_server(env, cwd / "gunicorn.log", cwd=cwd) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        yield Demo(url=url, port=port, cwd=cwd, env={**env, "HOST": "127.0.0.1", "PORT": str(port)})
