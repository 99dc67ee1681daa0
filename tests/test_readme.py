"""Every code block of README.md runs as written against the demo as `make run` starts it.

Python blocks run with this virtualenv's python, shell blocks with bash (`set -euo pipefail`, the venv's bin on
PATH, in the demo's directory, where ./llm_backend.db is the server's database); in both, the documented port
8080 becomes the test server's. YAML blocks are parsed, and models files go through the config loader.

Markers, HTML comments on the lines right before a block:
  <!-- not run: why -->        the block is not executed (installs, other programs' settings, ...)
  <!-- run: LLM_BACKEND_AUTH=keys -->   the block runs against the demo with key checking on
  <!-- run: .venv-clients -->  a Python block for client libraries of the second virtualenv (tests/clients)
  <!-- expect: 200 404 -->      the block's output, split on whitespace, is exactly this
A block that runs must exit 0 and print no OpenAI error object unless it says what it expects.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from llm_backend.config import load_models_file
from tests.conftest import REPO
from tests.demo_server import VENV_BIN, Demo, demo_server

README = REPO / "README.md"
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(not run|run|expect):\s*(.*?)\s*-->\s*$")
RUNNABLE = {"python", "sh", "bash"}
KNOWN = RUNNABLE | {"yaml"}
#: The address the README documents (make run's defaults), replaced by the test server's.
DOCUMENTED = re.compile(r"(127\.0\.0\.1|localhost):8080\b")
#: curl as the README shows it, plus: give up rather than hang, and say why on a transport error.
CLIENTS_VENV = ".venv-clients"
SHELL_PRELUDE = 'set -euo pipefail\ncurl() { command curl --silent --show-error --max-time 60 "$@"; }\n'


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.lang or 'text'}@L{self.line}"


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        markers: dict[str, str] = {}
        j = i - 1
        while j >= 0 and (not lines[j].strip() or MARKER.match(lines[j].strip())):
            mm = MARKER.match(lines[j].strip())
            if mm:
                markers[mm.group(1)] = mm.group(2)
            j -= 1
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        assert end < len(lines), f"README.md:{i + 1}: unclosed code block"
        blocks.append(Block(m.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1, markers))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
TO_RUN = [b for b in BLOCKS if b.lang in RUNNABLE and "not run" not in b.markers]


def test_every_block_is_runnable_validated_or_marked():
    assert len(BLOCKS) >= 8 and TO_RUN, "the README's code blocks were not found"
    for b in BLOCKS:
        if "not run" in b.markers:
            assert b.markers["not run"], f"README.md:{b.line}: say why the block is not run"
        else:
            assert b.lang in KNOWN, (
                f"README.md:{b.line}: a ```{b.lang} block must be marked <!-- not run: why -->"
            )


def test_no_block_has_characters_that_cannot_be_pasted():
    # a typographic ellipsis or quote in code is what made `api_key="sk-llmb-…"` raise UnicodeEncodeError
    for b in BLOCKS:
        if b.lang in KNOWN and "not run" not in b.markers:
            bad = sorted({c for c in b.code if ord(c) > 127})
            assert not bad, f"README.md:{b.line}: non-ASCII {bad} in a block meant to be pasted"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "yaml"], ids=lambda b: b.id)
def test_yaml_blocks_parse_and_models_files_load(block: Block, tmp_path: Path):
    data = yaml.safe_load(block.code)
    assert isinstance(data, dict), f"README.md:{block.line}: not a YAML mapping"
    if "not run" in block.markers:
        return  # another program's file (e.g. LibreChat's): valid YAML is all we can check
    path = tmp_path / "models.yaml"
    path.write_text(block.code)
    env = {"AZURE_OPENAI_API_KEY": "test-azure-key", "OPENAI_API_KEY": "test-openai-key"}
    models = load_models_file(path, env)
    assert [m.name for m in models] == [m["name"] for m in data["models"]]


@pytest.fixture(scope="module")
def demo_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Demo]]:
    """The demo as `make run` serves it (LLM_BACKEND_AUTH=none), or with another auth, each in a directory of
    its own; started on first use and kept for the module."""
    with contextlib.ExitStack() as stack:
        started: dict[str, Demo] = {}

        def get(auth: str) -> Demo:
            if auth not in started:
                cwd = tmp_path_factory.mktemp(f"demo-{auth}")
                started[auth] = stack.enter_context(demo_server(cwd, LLM_BACKEND_AUTH=auth))
            return started[auth]

        yield get


def _auth_of(block: Block) -> str:
    run = block.markers.get("run", "")
    m = re.fullmatch(r"LLM_BACKEND_AUTH=(\w+)", run)
    assert m or run in ("", CLIENTS_VENV), f"README.md:{block.line}: unknown run marker {run!r}"
    return m.group(1) if m else "none"


def _python_of(block: Block) -> Path:
    if block.markers.get("run") == CLIENTS_VENV:
        python = REPO / CLIENTS_VENV / "bin" / "python"
        if not python.exists():
            pytest.skip(f"{CLIENTS_VENV} is missing: `make install` creates it from requirements-clients.txt")
        return python
    return VENV_BIN / "python"


@pytest.mark.slow
@pytest.mark.parametrize("block", TO_RUN, ids=lambda b: b.id)
def test_block_runs_as_written(block: Block, demo_for: Callable[[str], Demo]):
    demo = demo_for(_auth_of(block))
    code = DOCUMENTED.sub(f"127.0.0.1:{demo.port}", block.code)
    if block.lang == "python":
        cmd = [str(_python_of(block)), "-c", code]
    else:
        cmd = ["bash", "-c", SHELL_PRELUDE + code]
    done = subprocess.run(cmd, cwd=demo.cwd, env=demo.env, capture_output=True, text=True, timeout=300)
    where = f"README.md:{block.line} ({block.lang})\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, where
    if "expect" in block.markers:
        assert done.stdout.split() == block.markers["expect"].split(), where
    else:
        assert '"error"' not in done.stdout, where
