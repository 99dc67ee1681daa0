"""Every kustomization renders with kubectl and every object validates against the Kubernetes schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.support import INSTALL_HINT, K8S, KUSTOMIZATIONS

SCHEMAS = Path(__file__).parent / "schemas"

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason=f"kubernetes-validate is not installed; {INSTALL_HINT}"
)

# The newest Kubernetes whose schemas kubernetes-validate bundles, and the oldest minor we support
# (native `preStop.sleep` is GA since 1.30; AKS still offers 1.31 and 1.32).
OLDEST_SUPPORTED = "1.30.0"


def newest_version() -> str:
    return kubernetes_validate.utils.latest_version()


def validate(obj: dict[str, Any], version: str) -> None:
    if crd_schema(obj) is not None:  # a custom resource: the operator's schema, kept offline
        validate_custom(obj)
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = "/".join(str(part) for part in error.path)
        name = f"{obj['kind']}/{obj['metadata'].get('name')}"
        pytest.fail(f"{name} is invalid for Kubernetes {version} at {where}: {error.message}")


def crd_schema(obj: dict[str, Any]) -> Path | None:
    """The offline schema of a custom resource (tests/deploy/schemas/<kind>-<group>-<version>.json)."""
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    if not group.count("."):
        return None  # a built-in API group (apps/v1, batch/v1, v1): kubernetes-validate knows it
    path = SCHEMAS / f"{str(obj.get('kind', '')).lower()}-{group}-{version}.json"
    if not path.exists():
        pytest.fail(f"{obj.get('kind')} ({obj.get('apiVersion')}) has no schema in {SCHEMAS}")
    return path


def validate_custom(obj: dict[str, Any]) -> None:
    path = crd_schema(obj)
    assert path is not None
    validator = jsonschema.Draft202012Validator(json.loads(path.read_text()))
    for error in validator.iter_errors(obj):
        where = "/".join(str(part) for part in error.absolute_path)
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} is invalid at {where}: {error.message}")


def test_newest_schemas_are_current() -> None:
    major, minor = (int(part) for part in newest_version().split(".")[:2])
    assert (major, minor) >= (1, 33), f"kubernetes-validate only knows Kubernetes {newest_version()}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_objects(rendered: dict[str, list[dict[str, Any]]], kustomization: str) -> None:
    docs = rendered[kustomization]
    assert docs, f"k8s/{kustomization} rendered nothing"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", ["newest", OLDEST_SUPPORTED])
def test_objects_validate_strictly(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str, version: str
) -> None:
    version = newest_version() if version == "newest" else version
    for obj in rendered[kustomization]:
        validate(obj, version)


def test_validator_rejects_a_broken_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The strict validation really looks: a misspelt field and a wrong type are caught."""
    deployment = next(d for d in rendered["base"] if d["kind"] == "Deployment")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 8080}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, newest_version(), strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, newest_version(), strict=True)


def test_every_manifest_file_is_rendered(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """No YAML under k8s/ is forgotten by its kustomization (patches and config files aside)."""
    identities = {(doc["kind"], doc["metadata"]["name"]) for docs in rendered.values() for doc in docs}
    for path in sorted(K8S.rglob("*.yaml")):
        if "rendered" in path.parts or path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or "kind" not in doc:
                continue  # a models file (ConfigMap content)
            key = (doc["kind"], doc["metadata"]["name"])
            assert key in identities or is_patch(path), f"{path.relative_to(K8S)}: {key} is never rendered"


def is_patch(path: Path) -> bool:
    kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    return any(patch.get("path") == path.name for patch in kustomization.get("patches", []))
