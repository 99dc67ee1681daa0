"""The Tiltfile, evaluated by a real Starlark interpreter with the Tilt built-ins it uses stubbed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import INSTALL_HINT, ROOT, app_containers, check_dockerfile, render

starlark = pytest.importorskip("starlark", reason=f"starlark-pyo3 is not installed; {INSTALL_HINT}")

TILTFILE = ROOT / "Tiltfile"


@dataclass
class Tilt:
    """Records what the Tiltfile asks of Tilt; `kustomize` really renders with kubectl."""

    kubectl: str
    flags: dict[str, Any]
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    defined_flags: dict[str, str] = field(default_factory=dict)

    def record(self, name: str, result: Any = None):
        def builtin(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result

        return builtin

    def named(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]

    def kustomize(self, path: str) -> str:
        docs = render(self.kubectl, str(Path(path).relative_to("k8s")))
        return yaml.safe_dump_all(docs)

    def define(self, kind: str):
        def define_flag(name: str, args: bool = False, usage: str = "") -> None:
            assert name not in self.defined_flags, f"flag {name} defined twice"
            assert usage, f"flag {name} has no usage text"
            self.defined_flags[name] = kind

        return define_flag

    def parse(self) -> dict[str, Any]:
        unknown = set(self.flags) - set(self.defined_flags)
        assert not unknown, f"flags passed but not defined by the Tiltfile: {unknown}"
        return dict(self.flags)

    def evaluate(self, source: str | None = None) -> Tilt:
        module = starlark.Module()
        builtins = {
            "docker_build": self.record("docker_build"),
            "sync": self.record("sync", lambda local, remote: {"sync": [local, remote]}),
            "run": self.record("run", lambda cmd, trigger=(): {"run": cmd, "trigger": list(trigger)}),
            "fall_back_on": self.record("fall_back_on", lambda files: {"fall_back_on": list(files)}),
            "k8s_yaml": self.record("k8s_yaml"),
            "kustomize": self.record("kustomize", self.kustomize),
            "decode_yaml_stream": self.record(
                "decode_yaml_stream", lambda text: list(yaml.safe_load_all(text))
            ),
            "encode_yaml_stream": self.record("encode_yaml_stream", lambda objs: yaml.safe_dump_all(objs)),
            "k8s_resource": self.record("k8s_resource"),
            "local_resource": self.record("local_resource"),
            "_define_bool": self.define("bool"),
            "_define_string": self.define("string"),
            "_parse": self.parse,
        }
        for name, function in builtins.items():
            module.add_callable(name, function)
        module["TRIGGER_MODE_AUTO"] = "TRIGGER_MODE_AUTO"
        module["TRIGGER_MODE_MANUAL"] = "TRIGGER_MODE_MANUAL"
        globals_ = starlark.Globals.extended_by([starlark.LibraryExtension.StructType])
        prelude = "config = struct(define_bool=_define_bool, define_string=_define_string, parse=_parse)\n"
        starlark.eval(module, starlark.parse("tilt-prelude.star", prelude), globals_)
        dialect = starlark.Dialect.extended()
        starlark.eval(module, starlark.parse("Tiltfile", source or TILTFILE.read_text(), dialect), globals_)
        return self


@pytest.fixture
def tilt(kubectl: str) -> Tilt:
    return Tilt(kubectl, {}).evaluate()


def dev_docs(kubectl: str) -> list[dict[str, Any]]:
    return render(kubectl, "overlays/dev")


def test_builds_the_app_image_with_live_update(tilt: Tilt, kubectl: str) -> None:
    [(args, kwargs)] = tilt.named("docker_build")
    image, context = args
    assert (ROOT / context).is_dir()
    assert (ROOT / context / kwargs.get("dockerfile", "Dockerfile")).is_file()
    images = {c["image"].rsplit(":", 1)[0] for _, _, c in app_containers(dev_docs(kubectl))}
    assert images == {image}, "docker_build must build the image the dev manifests run"
    steps = kwargs["live_update"]
    assert "fall_back_on" in steps[0], "fall_back_on must come first in live_update"
    synced = {step["sync"][0]: step["sync"][1] for step in steps if "sync" in step}
    assert synced == {"llm_backend": "/app/llm_backend", "openapi": "/app/openapi"}
    runs = [step for step in steps if "run" in step]
    assert runs and runs[-1]["run"] == "kill -HUP 1", "gunicorn (PID 1) reloads its workers on SIGHUP"
    assert set(runs[-1]["trigger"]) <= set(synced)
    assert steps.index(runs[-1]) == len(steps) - 1


def test_live_update_targets_match_the_dockerfile(tilt: Tilt) -> None:
    """The synced directories are where the image puts the sources, and the sync may write there."""
    [(_, kwargs)] = tilt.named("docker_build")
    global_args, stages = check_dockerfile.parse((ROOT / "Dockerfile").read_text())
    final = stages[-1]
    workdir = [i.args for i in final.instructions if i.keyword == "WORKDIR"][-1]
    copied = {
        str(Path(workdir) / i.args.split()[-1]): i.flags.get("chown")
        for i in final.instructions
        if i.keyword == "COPY" and "from" not in i.flags
    }
    variables = check_dockerfile.stage_variables(global_args, final)
    uid = check_dockerfile._expand([i.args for i in final.instructions if i.keyword == "USER"][-1], variables)
    for step in kwargs["live_update"]:
        if "sync" in step:
            remote = step["sync"][1]
            assert remote in copied, f"the image has nothing at {remote}"
            owner = check_dockerfile._expand(copied[remote] or "0:0", kwargs.get("build_args", {}))
            assert owner == uid, (
                f"{remote} would be owned by {owner}, not the user {uid} that live_update syncs as"
            )


def test_applies_the_dev_overlay(tilt: Tilt) -> None:
    assert [args for args, _ in tilt.named("kustomize")] == [("k8s/overlays/dev",)]
    assert len(tilt.named("k8s_yaml")) == 1
    assert "kind: Deployment" in tilt.named("k8s_yaml")[0][0][0]


def test_migration_runs_before_the_app(tilt: Tilt, kubectl: str) -> None:
    docs = dev_docs(kubectl)
    workloads = {d["metadata"]["name"] for d in docs if d["kind"] in ("Deployment", "Job", "StatefulSet")}
    resources = {args[0]: kwargs for args, kwargs in tilt.named("k8s_resource")}
    assert set(resources) <= workloads, f"k8s_resource names no workload: {set(resources) - workloads}"
    local = {args[0] for args, _ in tilt.named("local_resource")}
    for name, kwargs in resources.items():
        unknown = set(kwargs.get("resource_deps", [])) - workloads - local
        assert not unknown, f"{name} depends on unknown resources {unknown}"
    assert "llm-backend-migrate" in resources["llm-backend"]["resource_deps"]
    assert "postgres" in resources["llm-backend-migrate"]["resource_deps"]
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["metadata"]["name"] == "llm-backend-migrate"


def test_port_forwards_the_app_on_8080(tilt: Tilt, kubectl: str) -> None:
    resources = {args[0]: kwargs for args, kwargs in tilt.named("k8s_resource")}
    forwards = resources["llm-backend"]["port_forwards"]
    assert "8080:8080" in forwards
    ports = {p["containerPort"] for _, _, c in app_containers(dev_docs(kubectl)) for p in c.get("ports", [])}
    for forward in forwards:
        assert int(forward.split(":")[-1]) in ports
    local_ports = [int(f.split(":")[0]) for kw in resources.values() for f in kw.get("port_forwards", [])]
    assert len(local_ports) == len(set(local_ports)), "two port-forwards on one local port"


def test_runs_the_tests_locally(tilt: Tilt) -> None:
    resources = {args[0]: kwargs for args, kwargs in tilt.named("local_resource")}
    assert re.search(r"\b(make test|pytest)\b", resources["tests"]["cmd"])
    for name, kwargs in resources.items():
        for path in [*kwargs.get("deps", []), *kwargs.get("ignore", [])]:
            assert (ROOT / path).exists(), f"local_resource {name} names {path}, which does not exist"
        target = re.match(r"make (\S+)", kwargs["cmd"])
        if target:
            makefile = (ROOT / "Makefile").read_text()
            assert re.search(rf"^{re.escape(target.group(1))}:", makefile, re.M), f"no make {target.group(1)}"


def test_every_path_it_names_exists(tilt: Tilt) -> None:
    paths: list[str] = []
    for args, kwargs in tilt.named("docker_build"):
        paths += [args[1], kwargs.get("dockerfile", "Dockerfile")]
        for step in kwargs.get("live_update", []):
            paths += step.get("fall_back_on", []) + step.get("sync", [])[:1] + step.get("trigger", [])
    paths += [args[0] for args, _ in tilt.named("kustomize")]
    for _, kwargs in tilt.named("local_resource"):
        paths += kwargs.get("deps", [])
    assert paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the Tiltfile names paths that do not exist: {missing}"


def test_ui_is_off_by_default(tilt: Tilt) -> None:
    assert {"ui": "bool", "ui-image": "string"} == tilt.defined_flags
    assert all(args[0] != "chat-ui" for args, _ in tilt.named("k8s_resource"))
    assert len(tilt.named("k8s_yaml")) == 1


@pytest.mark.parametrize("image", [None, "ghcr.io/example/chat-ui:1.2.3"])
def test_ui_side_by_side_when_asked(kubectl: str, image: str | None) -> None:
    flags: dict[str, Any] = {"ui": True} | ({"ui-image": image} if image else {})
    tilt = Tilt(kubectl, flags).evaluate()
    assert [args for args, _ in tilt.named("kustomize")] == [("k8s/overlays/dev",), ("k8s/ui",)]
    ui_yaml = tilt.named("k8s_yaml")[1][0][0]
    deployment = next(d for d in yaml.safe_load_all(ui_yaml) if d["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    default = re.search(r'DEFAULT_UI_IMAGE = "([^"]+)"', TILTFILE.read_text())
    assert default
    assert container["image"] == (image or default.group(1))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OPENAI_API_BASE_URL"] == "http://llm-backend:8080/v1"
    resources = {args[0]: kwargs for args, kwargs in tilt.named("k8s_resource")}
    assert resources["chat-ui"]["resource_deps"] == ["llm-backend"]
    assert resources["chat-ui"]["port_forwards"] == ["3000:8080"]


def test_harness_rejects_unknown_builtins(kubectl: str) -> None:
    """The harness is strict: a Tilt built-in the stubs lack fails evaluation instead of passing silently."""
    with pytest.raises(starlark.StarlarkError):
        Tilt(kubectl, {}).evaluate("helm_resource('x', 'chart')\n")
    with pytest.raises(starlark.StarlarkError, match="not defined by the Tiltfile"):
        Tilt(kubectl, {"no-such-flag": True}).evaluate()
