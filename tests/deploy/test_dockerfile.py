"""Static checks of the Dockerfile and .dockerignore (no Docker engine here), and of the checker itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.support import INSTALL_HINT, ROOT, check_dockerfile

GOOD = (ROOT / "Dockerfile").read_text()


def problems_of(text: str, tmp_path: Path) -> list[str]:
    """Check a variant of the Dockerfile in a copy of the build context's needed files."""
    for name in ("requirements.txt", "pyproject.toml", "README.md", "gunicorn.conf.py", "alembic.ini"):
        (tmp_path / name).write_text("")
    for name in ("llm_backend", "openapi", "migrations", "config"):
        (tmp_path / name).mkdir(exist_ok=True)
    shutil.copy(ROOT / ".dockerignore", tmp_path / ".dockerignore")
    (tmp_path / "Dockerfile").write_text(text)
    return check_dockerfile.check(tmp_path / "Dockerfile", tmp_path)


def test_project_dockerfile_passes() -> None:
    assert check_dockerfile.check() == []


def test_variant_context_passes(tmp_path: Path) -> None:
    assert problems_of(GOOD, tmp_path) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("USER ${APP_UID}:${APP_UID}", "USER 0"), "root"),
        (("USER ${APP_UID}:${APP_UID}", "USER app"), "not numeric"),
        (("USER ${APP_UID}:${APP_UID}\n", ""), "no USER"),
        (("EXPOSE 8080", "EXPOSE 8000"), "EXPOSE"),
        (("HOST=0.0.0.0", "HOST=127.0.0.1"), "HOST=0.0.0.0"),
        (('CMD ["python", "-c"', 'CMD ["curl", "-f"'), "curl"),
        (
            ('CMD ["gunicorn", "-c", "gunicorn.conf.py", "llm_backend.asgi:app"]', "CMD gunicorn app"),
            "shell form",
        ),
        (("python:3.11-slim-bookworm", "python:3.12"), "python:3.11-slim"),
        (
            ("COPY --chown=${SOURCE_OWNER} openapi ./openapi", "COPY --chown=${SOURCE_OWNER} docs ./docs"),
            "does not exist",
        ),
        (("COPY --chown=${SOURCE_OWNER} config ./config", "COPY --chown=${SOURCE_OWNER} tests ./tests"), ""),
    ],
)
def test_checker_catches(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in GOOD, f"the Dockerfile no longer contains {old!r}; update this test"
    if new.startswith("COPY") and "tests" in new:
        (tmp_path / "tests").mkdir()
        expected = ".dockerignore"
    problems = problems_of(GOOD.replace(old, new), tmp_path)
    assert any(expected in p for p in problems), problems


def test_checker_wants_dependencies_in_their_own_layer(tmp_path: Path) -> None:
    merged = GOOD.replace("COPY requirements.txt ./\nRUN pip install -r requirements.txt\n", "")
    merged = merged.replace(
        "COPY pyproject.toml README.md ./", "COPY requirements.txt pyproject.toml README.md ./"
    )
    merged = merged.replace(
        "RUN pip install --no-deps .", "RUN pip install -r requirements.txt . \\\n    && true"
    )
    assert any("dependencies" in p or "own layer" in p for p in problems_of(merged, tmp_path))


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".venv/bin/python", True),
        (".git/HEAD", True),
        ("tests/test_app.py", True),
        ("llm_backend/__pycache__/app.cpython-311.pyc", True),
        ("llm_backend/api/__pycache__", True),
        ("data/spill.jsonl", True),
        ("llm_backend.db", True),
        (".env", True),
        ("k8s/base/deployment.yaml", True),
        ("llm_backend/app.py", False),
        ("openapi/openapi.yaml", False),
        ("migrations/env.py", False),
        ("README.md", False),
        ("requirements.txt", False),
    ],
)
def test_dockerignore(path: str, ignored: bool) -> None:
    patterns = check_dockerfile.dockerignore_patterns(ROOT / ".dockerignore")
    assert check_dockerfile.is_ignored(path, patterns) is ignored


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip(f"hadolint is not installed; {INSTALL_HINT}")
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_image_without_an_engine_says_so(tmp_path: Path) -> None:
    """`make image` where `docker info` fails: static checks run, a clear message, exit 0."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    docker = fake_bin / "docker"
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "VENV": str(Path(sys.executable).parent.parent)}
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "image.sh"), "llm-backend:test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NO DOCKER ENGINE" in result.stdout
    assert "static checks passed" in result.stdout
