"""Static checks of the Dockerfile and .dockerignore, for machines without a Docker engine."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Instruction:
    """One Dockerfile instruction: its keyword, flags (--chown=...), the rest of the line, and its line."""

    keyword: str
    flags: dict[str, str]
    args: str
    line: int


@dataclass
class Stage:
    """One build stage: its base image, its name and its instructions."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Parse a Dockerfile into the global ARG defaults and its stages (continuations joined)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    if buffer:
        logical.append((start, buffer))
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        instruction = Instruction(keyword, flags, rest, number)
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value
    )


def _env_pairs(args: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for token in args.split():
        name, sep, value = token.partition("=")
        if sep:
            pairs[name] = value.strip("\"'")
    return pairs


def stage_variables(global_args: dict[str, str], stage: Stage) -> dict[str, str]:
    """ARG defaults and ENV values of a stage, as the build resolves them by the end of the stage."""
    variables: dict[str, str] = {}
    for instruction in stage.instructions:
        if instruction.keyword == "ARG":
            name, sep, default = instruction.args.partition("=")
            name = name.strip()
            variables[name] = _expand(default.strip(), variables) if sep else global_args.get(name, "")
        elif instruction.keyword == "ENV":
            for name, value in _env_pairs(instruction.args).items():
                variables[name] = _expand(value, variables)
    return variables


def dockerignore_patterns(path: Path) -> list[str]:
    """The patterns of a .dockerignore, in order, without comments and blank lines."""
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` stay within one path element, `**` spans any number."""
    body = ""
    for piece in pattern.strip("/").split("/"):
        if piece == "**":
            body += "(?:[^/]+/)*"
            continue
        # `[...]` character classes pass through; everything else is literal.
        for token in re.findall(r"\[[^\]]*\]|.", piece):
            if token.startswith("[") and len(token) > 1:
                body += token.replace("[!", "[^")
            else:
                body += "[^/]*" if token == "*" else "[^/]" if token == "?" else re.escape(token)
        body += "/"
    return re.compile(f"^{body.removesuffix('/')}(?:/.*)?$", re.S)


def is_ignored(relative: str, patterns: list[str]) -> bool:
    """Whether the context path is left out of the build context (the last matching pattern wins)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if _pattern_regex(pattern.removeprefix("!")).match(relative.strip("/")):
            ignored = not negate
    return ignored


def check(dockerfile: Path = ROOT / "Dockerfile", context: Path = ROOT) -> list[str]:
    """Every problem found in the Dockerfile (empty when it is fine)."""
    problems: list[str] = []
    if not dockerfile.exists():
        return [f"{dockerfile} does not exist"]
    global_args, stages = parse(dockerfile.read_text())
    if len(stages) < 2:
        problems.append("not multi-stage: build the dependencies in one stage and copy them into the runtime")
    if not stages:
        return problems
    final = stages[-1]
    variables = stage_variables(global_args, final)
    base = _expand(final.base, global_args)
    if not re.fullmatch(r"python:3\.11-slim(-\w+)?", base):
        problems.append(f"the runtime stage is based on {base!r}, not python:3.11-slim")

    def last(keyword: str) -> Instruction | None:
        found = [i for i in final.instructions if i.keyword == keyword]
        return found[-1] if found else None

    user = last("USER")
    if user is None:
        problems.append("no USER in the runtime stage: the container would run as root")
    else:
        uid = _expand(user.args, variables).split(":")[0]
        if not uid.isdigit():
            problems.append(f"USER {uid!r} is not numeric: Kubernetes cannot verify runAsNonRoot")
        elif int(uid) == 0:
            problems.append("USER is root (uid 0)")
    port = variables.get("PORT", "8080")
    exposed = [p.split("/")[0] for i in final.instructions if i.keyword == "EXPOSE" for p in i.args.split()]
    if exposed != [port]:
        problems.append(f"EXPOSE {exposed} does not match the port gunicorn binds (PORT={port})")
    if variables.get("HOST") != "0.0.0.0":
        problems.append("ENV HOST=0.0.0.0 missing: gunicorn would bind to loopback inside the container")
    healthcheck = last("HEALTHCHECK")
    if healthcheck is None:
        problems.append("no HEALTHCHECK")
    elif re.search(r"\b(curl|wget)\b", healthcheck.args):
        problems.append("HEALTHCHECK uses curl/wget, which the slim image does not have; use python")
    command = last("CMD") or last("ENTRYPOINT")
    if command is None:
        problems.append("no CMD")
    else:
        try:
            argv = json.loads(command.args)
        except json.JSONDecodeError:
            argv = None
        if not isinstance(argv, list):
            problems.append("CMD is in shell form: gunicorn would not be PID 1 and would miss SIGTERM")
        elif argv[:3] != ["gunicorn", "-c", "gunicorn.conf.py"]:
            problems.append(f"CMD {argv} does not start gunicorn -c gunicorn.conf.py")

    # Dependencies in their own layer: requirements.txt is copied and installed before any source.
    for stage in stages:
        copies = [i for i in stage.instructions if i.keyword in ("COPY", "ADD") and "from" not in i.flags]
        runs = [i for i in stage.instructions if i.keyword == "RUN"]
        if not copies:
            continue
        first_copy = copies[0]
        if first_copy.args.split()[:-1] == ["requirements.txt"]:
            install = [r for r in runs if "-r requirements.txt" in r.args]
            if not install or (len(copies) > 1 and install[0].line > copies[1].line):
                problems.append("requirements.txt is not installed in its own layer before the sources")
            break
    else:
        problems.append("no stage copies requirements.txt alone first: dependencies are not cached")

    patterns = dockerignore_patterns(context / ".dockerignore")
    for stage in stages:
        for instruction in stage.instructions:
            if instruction.keyword not in ("COPY", "ADD") or "from" in instruction.flags:
                continue
            for source in instruction.args.split()[:-1]:
                if not (context / source).exists():
                    problems.append(f"line {instruction.line}: COPY source {source!r} does not exist")
                elif is_ignored(source, patterns):
                    problems.append(f"line {instruction.line}: COPY source {source!r} is in .dockerignore")
    return problems


def main(argv: list[str]) -> int:
    """Print the problems of the Dockerfile given (default: the project's) and exit 1 if there are any."""
    dockerfile = Path(argv[1]) if len(argv) > 1 else ROOT / "Dockerfile"
    problems = check(dockerfile, dockerfile.resolve().parent)
    for problem in problems:
        print(f"{dockerfile}: {problem}")
    if not problems:
        print(f"{dockerfile}: static checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
