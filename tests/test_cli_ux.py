"""What a new user meets first, run as they run it: `make` and `make help`, `llm-backend check-config FILE`,
the CLI against a database that is unreachable or not migrated, `| head`, and listings for people
(aligned tables, names beside ids) and for scripts (`--json`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from llm_backend.db.repositories import RequestLogRepository
from llm_backend.db.session import make_engine, session_scope
from tests.conftest import REPO, free_port
from tests.conftest_db import TEST_DATABASE_URL, create_pg_database, db_url, drop_pg_database, pg_migrated_url

__all__ = ["db_url", "pg_migrated_url"]

CLI = Path(sys.executable).with_name("llm-backend")
PASSWORD = "pa55-w0rd-never-shown"


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, **kw: Any
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    if "stdout" not in kw:
        kw["capture_output"] = True
    return subprocess.run(
        [str(CLI), *args], env={**base, **(env or {})}, cwd=cwd, text=True, timeout=120, check=False, **kw
    )


# -- make ------------------------------------------------------------------------------------------------

TARGETS = [
    "install", "run", "serve", "test", "lint", "format", "bench", "migrate",
    "check-deploy", "image", "k8s", "clean", "ui-test",
]  # fmt: skip


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_plain_make_prints_the_help_and_does_nothing_else(tmp_path: Path) -> None:
    venv = tmp_path / "venv"  # were plain `make` to install, this virtualenv would appear
    helped = make("help", f"VENV={venv}")
    plain = make(f"VENV={venv}")
    assert helped.returncode == 0 and plain.returncode == 0, helped.stderr + plain.stderr
    assert plain.stdout == helped.stdout
    assert not venv.exists()
    described = dict(
        re.match(r"\s+(\S+)\s+(.+)", line).groups()  # type: ignore[union-attr]
        for line in helped.stdout.splitlines()
        if re.match(r"\s+\S+\s+\S", line)
    )
    for target in [*TARGETS, "help"]:
        assert len(described.get(target, "")) > 10, (
            f"`make help` does not describe {target}:\n{helped.stdout}"
        )
    assert "make install" in helped.stdout and "HOST=" in helped.stdout and "PORT=" in helped.stdout


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_name_still_works(target: str, tmp_path: Path) -> None:
    dry = make("-n", target, f"VENV={tmp_path / 'venv'}")  # -n: print the commands, run none
    assert dry.returncode == 0, dry.stderr
    assert "No rule to make target" not in dry.stderr


# -- check-config ----------------------------------------------------------------------------------------

GOOD = """
models:
  - name: gpt-4o
    aliases: [gpt-4]
    backends:
      - provider: azure
        endpoint: https://eastus.openai.azure.com
        deployment: gpt-4o-prod
        api_key: ${AZURE_OPENAI_API_KEY}
      - provider: mock
  - name: mock
    backends: [{provider: mock}]
"""

BAD = """
models:
  - name: gpt-4o
    stratgy: priority
    backends:
      - provider: azure
        endpont: https://eastus.openai.azure.com
        deployment: gpt-4o-prod
        api_key: ${AZURE_OPENAI_API_KEY}
        timeout: {conect: 3}
  - name: mock
    retries: -2
    backends:
      - provider: mok
  - name: gpt-4
    backend: [{provider: mock}]
"""

BAD_PROBLEMS = [
    ("models[0] (gpt-4o).stratgy", "unknown key; did you mean 'strategy'?"),
    ("models[0] (gpt-4o).backends[0].endpont", "unknown key; did you mean 'endpoint'?"),
    (
        "models[0] (gpt-4o).backends[0].api_key",
        "AZURE_OPENAI_API_KEY is not set; export AZURE_OPENAI_API_KEY",
    ),
    ("models[0] (gpt-4o).backends[0].timeout.conect", "unknown key; did you mean 'connect'?"),
    ("models[1] (mock).retries", "expected a whole number >= 0"),
    ("models[1] (mock).backends[0].provider", "'mok' is not a provider; did you mean 'mock'?"),
    ("models[2] (gpt-4).backend", "unknown key; did you mean 'backends'?"),
]


def write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_config_file_argument_prints_a_summary(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    done = run("check-config", str(path), env={"AZURE_OPENAI_API_KEY": "az-secret-value"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"{path}: valid; 2 models, 3 backends"
    assert (
        "gpt-4o" in done.stdout
        and "gpt-4" in done.stdout
        and "https://eastus.openai.azure.com" in done.stdout
    )
    assert "az-secret-value" not in done.stdout + done.stderr
    # the argument wins over LLM_BACKEND_CONFIG, which alone still works as before
    other = write(tmp_path, BAD, "other.yaml")
    both = run("check-config", str(path), env={"AZURE_OPENAI_API_KEY": "k", "LLM_BACKEND_CONFIG": str(other)})
    assert both.returncode == 0, both.stderr
    alone = run("check-config", env={"AZURE_OPENAI_API_KEY": "k", "LLM_BACKEND_CONFIG": str(path)})
    assert alone.returncode == 0 and alone.stdout == done.stdout


def test_check_config_reports_every_problem_with_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    done = run("check-config", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert lines[-1] == f"llm-backend: {len(BAD_PROBLEMS)} errors in {path}"
    problems = lines[:-1]
    assert len(problems) == len(BAD_PROBLEMS), done.stderr
    for place, message in BAD_PROBLEMS:
        wanted = f"{path}: {place}: "
        line = next((p for p in problems if p.startswith(wanted)), None)
        assert line is not None, f"no line for {place}:\n{done.stderr}"
        assert message in line, line
    # the misspelt `backend` is not reported a second time as "backends is missing"
    assert not any("'backends' is missing" in p for p in problems)


def test_check_config_json_for_scripts(tmp_path: Path) -> None:
    good = run(
        "check-config", "--json", str(write(tmp_path, GOOD)), env={"AZURE_OPENAI_API_KEY": "az-secret"}
    )
    assert good.returncode == 0, good.stderr
    doc = json.loads(good.stdout)
    assert doc["valid"] is True
    assert [m["name"] for m in doc["models"]] == ["gpt-4o", "mock"]
    assert [b["provider"] for b in doc["models"][0]["backends"]] == ["azure", "mock"]
    assert "az-secret" not in good.stdout
    bad = run("check-config", "--json", str(write(tmp_path, BAD, "bad.yaml")))
    assert bad.returncode == 2
    doc = json.loads(bad.stdout)
    assert doc["valid"] is False and len(doc["errors"]) == len(BAD_PROBLEMS)


def test_check_config_unreadable_file_and_bad_yaml(tmp_path: Path) -> None:
    missing = run("check-config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2
    assert f"{tmp_path / 'absent.yaml'}: cannot read the models file" in missing.stderr
    broken = run("check-config", str(write(tmp_path, "models:\n  - name: [unclosed\n")))
    assert broken.returncode == 2 and "line " in broken.stderr and "invalid YAML" in broken.stderr
    assert "Traceback" not in missing.stderr + broken.stderr


def test_start_up_reports_every_problem_too(tmp_path: Path) -> None:
    """`llm-backend serve` checks before gunicorn forks: every problem, one line each, exit code 2."""
    path = write(tmp_path, BAD)
    done = run("serve", "--port", str(free_port()), env={"LLM_BACKEND_CONFIG": str(path)})
    assert done.returncode == 2
    prefix = "llm-backend: configuration error: "
    problems = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    assert len(problems) == len(BAD_PROBLEMS), done.stderr
    assert f"llm-backend: {len(BAD_PROBLEMS)} configuration errors" in done.stderr


# -- the database is not there, or not migrated ------------------------------------------------------------

COMMANDS = [
    ("keys", "list"),
    ("keys", "list", "--json"),
    ("keys", "create", "--name", "first"),
    ("keys", "disable", "key_0123456789abcdef"),
    ("keys", "enable", "key_0123456789abcdef"),
    ("keys", "delete", "key_0123456789abcdef"),
    ("usage",),
    ("usage", "--json"),
    ("prune", "--older-than", "30d"),
]


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *hints: str) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("llm-backend: ")
    assert "Traceback" not in line and "sqlalche.me" not in line
    assert PASSWORD not in done.stderr
    for hint in hints:
        assert hint in line, line
    return line


@pytest.mark.parametrize("command", [*COMMANDS, ("migrate",)], ids=" ".join)
def test_unreachable_postgresql_is_one_line_without_the_password(command: tuple[str, ...]) -> None:
    url = f"postgresql://llmb:{PASSWORD}@127.0.0.1:{free_port()}/llmb"  # nothing listens there
    line = assert_one_clear_line(run(*command, env={"DATABASE_URL": url}), "DATABASE_URL", "cannot connect")
    assert "llmb:***@127.0.0.1" in line


def test_unmigrated_sqlite_file_says_run_migrate(tmp_path: Path) -> None:
    db = tmp_path / "llmb.db"
    db.touch()  # a file, but no schema
    env = {"DATABASE_URL": f"sqlite:///{db}"}
    for command in COMMANDS:
        assert_one_clear_line(run(*command, env=env), "not set up yet", "run `llm-backend migrate`")
    migrated = run("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    listing = run("keys", "list", env=env)
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr


def test_missing_sqlite_file_is_not_created_by_a_listing(tmp_path: Path) -> None:
    line = assert_one_clear_line(run("keys", "list", cwd=tmp_path), "llm-backend migrate", "DATABASE_URL")
    assert "./llm_backend.db" in line  # the default, since DATABASE_URL is not set
    assert not (tmp_path / "llm_backend.db").exists()
    nowhere = tmp_path / "no" / "such" / "dir" / "x.db"
    assert_one_clear_line(run("migrate", env={"DATABASE_URL": f"sqlite:///{nowhere}"}), "DATABASE_URL")


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://u:" + PASSWORD + "@db/x", "driver that is not installed"),
    ],
)
def test_a_database_url_that_cannot_work(url: str, hint: str) -> None:
    assert_one_clear_line(run("keys", "list", env={"DATABASE_URL": url}), hint)


@pytest.mark.postgres
def test_unmigrated_postgresql_says_run_migrate() -> None:
    if not TEST_DATABASE_URL:
        pytest.skip("PostgreSQL variant: set TEST_DATABASE_URL")
    url = create_pg_database()
    try:
        for command in (("keys", "list"), ("usage",), ("prune", "--older-than", "1d")):
            assert_one_clear_line(
                run(*command, env={"DATABASE_URL": url}), "not set up yet", "llm-backend migrate"
            )
    finally:
        drop_pg_database(url)


# -- | head ------------------------------------------------------------------------------------------------


def closed_pipe_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reading end is already closed, as after `| head` has exited."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return run(*args, env=env, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)


def add_usage(url: str, key_ids: list[str | None], rows: int) -> None:
    now = datetime.now(UTC)
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            RequestLogRepository(session).insert_ignore(
                [
                    {
                        "request_id": f"req_{i:06d}_{now.timestamp()}",
                        "created_at": now - timedelta(minutes=i),
                        "route": "/v1/chat/completions",
                        "operation": "chat",
                        "status_code": 200 if i % 5 else 502,
                        "outcome": "ok" if i % 5 else "upstream_error",
                        "stream": False,
                        "model_requested": "gpt-4o",
                        "model": ("gpt-4o", "mock")[(i // len(key_ids)) % 2],
                        "key_id": key_ids[i % len(key_ids)],
                        "user": f"user-{i % 50}",
                        "attempts": 1,
                        "prompt_tokens": 10,
                        "completion_tokens": 5,
                        "total_tokens": 15,
                        "tokens_estimated": False,
                        "latency_ms": 1.0,
                    }
                    for i in range(rows)
                ]
            )
    finally:
        engine.dispose()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'llmb.db'}"
    assert run("migrate", env={"DATABASE_URL": db}).returncode == 0
    add_usage(db, [None], 2000)
    for command in (
        ("usage", "--json", "--group-by", "user,day"),
        ("usage", "--group-by", "user,day"),
        ("keys", "list"),
    ):
        done = closed_pipe_run(*command, env={"DATABASE_URL": db})
        assert done.returncode == 141, (command, done.stderr)
        assert done.stderr == "", (command, done.stderr)


# -- listings ---------------------------------------------------------------------------------------------


@pytest.fixture
def listed(db_url: str) -> Iterator[dict[str, Any]]:
    """Two keys made with the CLI, a third made and deleted, and request-log rows for all three."""
    env = {"DATABASE_URL": db_url}
    made = {}
    for name, extra in (
        ("team-a", ("--models", "gpt-4o,mock", "--rpm", "60", "--expires", "30d", "--owner", "alice")),
        ("team-b", ()),
        ("gone", ()),
    ):
        done = run("keys", "create", "--name", name, "--json", *extra, env=env)
        assert done.returncode == 0, done.stderr
        made[name] = json.loads(done.stdout)
        assert made[name]["secret"].startswith("sk-llmb-") and made[name]["name"] == name
    assert run("keys", "delete", made["gone"]["id"], env=env).returncode == 0
    add_usage(db_url, [made["team-a"]["id"], made["team-b"]["id"], made["gone"]["id"], None], 40)
    yield {"env": env, "keys": made}


def columns_of(header: str) -> dict[str, int]:
    return {m.group(0): m.start() for m in re.finditer(r"\S+", header)}


def test_usage_names_keys_beside_their_ids(listed: dict[str, Any]) -> None:
    env, keys = listed["env"], listed["keys"]
    table = run("usage", "--since", "1d", env=env)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.rstrip("\n").splitlines()
    cols = columns_of(header)
    assert list(cols)[:3] == ["key_id", "key_name", "model"]
    assert len(lines) == 8  # 4 keys (one deleted, one none) x 2 models
    for line in lines:
        key_id = line[cols["key_id"] :].split()[0]
        name = line[cols["key_name"] :].split()[0]
        model = line[cols["model"] :].split()[0]
        assert model in ("gpt-4o", "mock"), line
        expected = {k["id"]: k["name"] for k in keys.values()}.get(key_id, "-")
        if key_id == keys["gone"]["id"]:
            expected = "(deleted)"
        assert name == expected, line
        # numbers are right-aligned under their header
        assert line[: cols["requests"] + len("requests")].rstrip().endswith("5"), line

    doc = json.loads(run("usage", "--since", "1d", "--json", env=env).stdout)
    names = {r["key_id"]: r["key_name"] for r in doc}
    assert names[keys["team-a"]["id"]] == "team-a" and names[keys["team-b"]["id"]] == "team-b"
    assert names[keys["gone"]["id"]] is None and names[None] is None
    assert sum(r["requests"] for r in doc) == 40

    for key in (keys["team-a"]["id"], "team-a"):  # a key by its id or by its name
        only = json.loads(run("usage", "--since", "1d", "--json", "--key", key, env=env).stdout)
        assert {r["key_name"] for r in only} == {"team-a"} and sum(r["requests"] for r in only) == 10
    gone = json.loads(run("usage", "--since", "1d", "--json", "--key", keys["gone"]["id"], env=env).stdout)
    assert sum(r["requests"] for r in gone) == 10

    by_model = run("usage", "--since", "1d", "--group-by", "model", env=env).stdout.splitlines()
    assert by_model[0].split()[:3] == ["model", "requests", "errors"]


def test_keys_list_is_a_table_for_people_and_json_for_scripts(listed: dict[str, Any]) -> None:
    env, keys = listed["env"], listed["keys"]
    table = run("keys", "list", env=env)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.rstrip("\n").splitlines()
    cols = columns_of(header)
    assert list(cols)[:6] == ["id", "name", "owner", "prefix", "enabled", "models"]
    assert len(lines) == 2
    assert "[" not in table.stdout and "'" not in table.stdout and "None" not in table.stdout
    rows = {line[cols["name"] :].split()[0]: line for line in lines}
    team_a = rows["team-a"]
    assert team_a[cols["id"] :].startswith(keys["team-a"]["id"])
    assert team_a[cols["owner"] :].startswith("alice")
    assert team_a[cols["prefix"] :].startswith(keys["team-a"]["prefix"])
    assert team_a[cols["enabled"] :].startswith("yes")
    assert team_a[cols["models"] :].startswith("gpt-4o, mock")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\s", team_a[cols["expires_at"] :]), team_a
    assert rows["team-b"][cols["models"] :].startswith("all")
    assert keys["team-a"]["secret"][12:] not in table.stdout

    doc = json.loads(run("keys", "list", "--json", env=env).stdout)
    assert {k["name"]: k["id"] for k in doc} == {n: keys[n]["id"] for n in ("team-a", "team-b")}
    team_a_json = next(k for k in doc if k["name"] == "team-a")
    assert team_a_json["models"] == ["gpt-4o", "mock"] and team_a_json["rpm"] == 60
    assert datetime.fromisoformat(team_a_json["expires_at"]) > datetime.now(UTC)
    assert "secret" not in team_a_json and "key_hash" not in team_a_json

    assert run("keys", "disable", keys["team-b"]["id"], env=env).returncode == 0
    disabled = run("keys", "list", "--owner", "alice", env=env).stdout
    assert "team-a" in disabled and "team-b" not in disabled
    unknown = run("keys", "disable", "key_does_not_exist", env=env)
    assert (
        unknown.returncode == 1
        and "key_does_not_exist" in unknown.stderr
        and "Traceback" not in unknown.stderr
    )
