"""Structural checks of the rendered manifests against the app, its spec, gunicorn and the Dockerfile."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.support import (
    OVERLAYS,
    ROOT,
    app_containers,
    check_dockerfile,
    container_env,
    env_names_read_by_app,
    gunicorn_default_port,
    objects_of,
    openapi_get_paths,
    pod_specs,
    the,
)

Docs = dict[str, list[dict[str, Any]]]
# Where the app container must be read-only: everywhere but dev, whose live_update writes into /app.
READ_ONLY = ("base", "overlays/prod")
APP_KUSTOMIZATIONS = ("base", *(f"overlays/{o}" for o in OVERLAYS))
PLACEHOLDER = re.compile(r"REPLACE_ME|change-me|CHANGE_ME|example|placeholder|<[^>]+>", re.I)
TOKEN = re.compile(r"[A-Za-z0-9+/=_.~-]{24,}")


def app_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return the(docs, "Deployment", "llm-backend")


def app_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = app_deployment(docs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "llm-backend")


def effective_port(docs: list[dict[str, Any]]) -> int:
    env = container_env(docs, app_container(docs))
    return int(env["PORT"]) if isinstance(env.get("PORT"), str) else gunicorn_default_port()


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def interpolated_names(value: Any) -> set[str]:
    """Names of the ${VAR} references in the values of a parsed YAML document."""
    if isinstance(value, dict):
        return set().union(*(interpolated_names(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(interpolated_names(v) for v in value))
    return set(re.findall(r"\$\{(\w+)\}", value)) if isinstance(value, str) else set()


def real_looking(value: str) -> str | None:
    """Why a Secret value looks like a real credential, or None for an empty value or a placeholder."""
    if value == "":
        return None
    if "://" in value:
        parts = urlsplit(value)
        if parts.password is not None and not PLACEHOLDER.search(parts.password):
            return "a URL with a password that is not a placeholder"
        rest = value.replace(parts.password or "", "")
        return "a URL with a token in it" if TOKEN.search(PLACEHOLDER.sub("", rest)) else None
    if not PLACEHOLDER.search(value):
        return "not a placeholder (REPLACE_ME, change-me, <...>) and not empty"
    if TOKEN.search(PLACEHOLDER.sub("", value)):
        return "a placeholder marker next to a long token"
    return None


# --- probes, ports and the HTTP surface --------------------------------------------------------------


@pytest.mark.parametrize("kustomization", APP_KUSTOMIZATIONS)
def test_probes_point_at_spec_routes(rendered: Docs, kustomization: str) -> None:
    docs = rendered[kustomization]
    container = app_container(docs)
    paths = openapi_get_paths()
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        assert probe in container, f"{kustomization}: the app container has no {probe}"
        http = container[probe]["httpGet"]
        assert http["path"] == path, f"{kustomization}: {probe} should use {path}"
        assert path in paths, f"{probe} uses {path}, which openapi/openapi.yaml has no GET operation for"
        assert named_port(container, http["port"]) == effective_port(docs)


@pytest.mark.parametrize("kustomization", APP_KUSTOMIZATIONS)
def test_container_port_is_gunicorns_bind(rendered: Docs, kustomization: str) -> None:
    docs = rendered[kustomization]
    container = app_container(docs)
    env = container_env(docs, container)
    port = effective_port(docs)
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert env.get("HOST") == "0.0.0.0", "gunicorn binds HOST (default 127.0.0.1): set HOST=0.0.0.0"
    service = the(docs, "Service", "llm-backend")
    for service_port in service["spec"]["ports"]:
        assert named_port(container, service_port["targetPort"]) == port
    annotations = app_deployment(docs)["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(port)
    assert annotations.get("prometheus.io/path") == "/metrics"


def test_dockerfile_exposes_gunicorns_port() -> None:
    global_args, stages = check_dockerfile.parse((ROOT / "Dockerfile").read_text())
    variables = check_dockerfile.stage_variables(global_args, stages[-1])
    exposed = [i.args for i in stages[-1].instructions if i.keyword == "EXPOSE"]
    assert exposed == [variables.get("PORT", str(gunicorn_default_port()))] == ["8080"]


def test_service_pdb_and_hpa_select_the_app_pods(rendered: Docs) -> None:
    for kustomization in APP_KUSTOMIZATIONS:
        docs = rendered[kustomization]
        deployment = app_deployment(docs)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        assert the(docs, "Service", "llm-backend")["spec"]["selector"].items() <= labels.items()
        for pdb in objects_of(docs, "PodDisruptionBudget"):
            assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for hpa in objects_of(docs, "HorizontalPodAutoscaler"):
            assert hpa["apiVersion"] == "autoscaling/v2"
            assert hpa["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "llm-backend",
            }
            assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# --- environment ---------------------------------------------------------------------------------------


def manifest_env_names(rendered: Docs) -> dict[str, set[str]]:
    """Env var name -> where it is set, over every container running the app image."""
    names: dict[str, set[str]] = {}
    for kustomization in APP_KUSTOMIZATIONS:
        docs = rendered[kustomization]
        for workload, _, container in app_containers(docs):
            for name in container_env(docs, container):
                names.setdefault(name, set()).add(f"{kustomization}: {workload}")
    return names


def test_env_names_are_declared_by_the_app(rendered: Docs) -> None:
    declared, read = env_names_read_by_app()
    known = declared or read
    unknown = {name: where for name, where in manifest_env_names(rendered).items() if name not in known}
    assert not unknown, f"manifests set variables the app does not declare (llm_backend/config.py): {unknown}"


def test_env_names_are_read_in_code(rendered: Docs) -> None:
    _, read = env_names_read_by_app()
    unread = {name: where for name, where in manifest_env_names(rendered).items() if name not in read}
    assert not unread, f"no code in llm_backend/ or gunicorn.conf.py reads: {unread}"


@pytest.mark.parametrize("kustomization", APP_KUSTOMIZATIONS)
def test_models_file_is_mounted_and_its_variables_are_set(rendered: Docs, kustomization: str) -> None:
    docs = rendered[kustomization]
    for workload, spec, container in app_containers(docs):
        env = container_env(docs, container)
        config_path = Path(env["LLM_BACKEND_CONFIG"])
        mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        config_map = the(docs, "ConfigMap", volume["configMap"]["name"])
        models = yaml.safe_load(config_map["data"][config_path.name])
        assert models["models"], f"{kustomization}: the models file lists no model"
        for name in interpolated_names(models):
            assert name in env, f"{kustomization} {workload}: the models file uses ${{{name}}}, never set"


@pytest.mark.parametrize("kustomization", APP_KUSTOMIZATIONS)
def test_models_file_loads_with_the_apps_own_parser(
    rendered: Docs, kustomization: str, tmp_path: Path
) -> None:
    config = pytest.importorskip("llm_backend.config")
    docs = rendered[kustomization]
    env = container_env(docs, app_container(docs))
    config_path = Path(env["LLM_BACKEND_CONFIG"])
    config_map = next(c for c in objects_of(docs, "ConfigMap") if config_path.name in c.get("data", {}))
    models_file = tmp_path / config_path.name
    models_file.write_text(config_map["data"][config_path.name])
    placeholders = {
        name: "placeholder" for name in interpolated_names(yaml.safe_load(models_file.read_text()))
    }
    models = config.load_models_file(models_file, placeholders)
    assert [m.name for m in models]


def test_migration_job_runs_migrate_with_the_apps_settings(rendered: Docs) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "llm-backend" in scripts
    for kustomization in APP_KUSTOMIZATIONS:
        docs = rendered[kustomization]
        job = the(docs, "Job", "llm-backend-migrate")
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["llm-backend", "migrate"]
        assert container["image"] == app_container(docs)["image"]
        job_env = container_env(docs, container)
        app_env = container_env(docs, app_container(docs))
        assert job_env == app_env, f"{kustomization}: the Job's settings differ from the app's"
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


# --- secrets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "0123456789abcdef0123456789abcdef",
        "sk-llmb-Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5",
        "postgresql+psycopg://app:hunter2@db.example.com:5432/app",
        "rediss://:s3cr3t@cache:6380/0",
        "hunter2",
        "REPLACE_ME-Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0",
    ],
)
def test_secret_detector_flags_real_looking_values(value: str) -> None:
    assert real_looking(value) is not None


@pytest.mark.parametrize(
    "value",
    ["", "REPLACE_ME", "dev-admin-key-change-me", "redis://redis:6379/0", "postgresql://u:REPLACE_ME@h/db"],
)
def test_secret_detector_accepts_placeholders(value: str) -> None:
    assert real_looking(value) is None


def test_no_secret_carries_a_real_value(rendered: Docs) -> None:
    secrets = [(k, s) for k, docs in rendered.items() for s in objects_of(docs, "Secret")]
    assert secrets, "the base should carry a Secret example"
    for kustomization, secret in secrets:
        name = f"{kustomization}: Secret/{secret['metadata']['name']}"
        assert not secret.get("data"), f"{name}: use stringData so reviewers can see there is no value"
        for key, value in secret.get("stringData", {}).items():
            reason = real_looking(value)
            assert reason is None, f"{name} {key} is {reason}"


def test_secret_settings_come_from_secrets(rendered: Docs) -> None:
    for kustomization in APP_KUSTOMIZATIONS:
        docs = rendered[kustomization]
        for workload, _, container in app_containers(docs):
            for item in container.get("env", []):
                if re.search(r"KEY|PASSWORD|SECRET|TOKEN|DATABASE_URL|REDIS_URL", item["name"]):
                    assert "secretKeyRef" in item.get("valueFrom", {}), (
                        f"{kustomization} {workload}: {item['name']} must come from a Secret"
                    )
        for config_map in objects_of(docs, "ConfigMap"):
            leaked = [k for k in config_map.get("data", {}) if re.search(r"KEY|PASSWORD|SECRET|TOKEN", k)]
            assert not leaked, f"{kustomization}: ConfigMap {config_map['metadata']['name']} holds {leaked}"


# --- security ---------------------------------------------------------------------------------------------


def dockerfile_uid() -> int:
    global_args, stages = check_dockerfile.parse((ROOT / "Dockerfile").read_text())
    variables = check_dockerfile.stage_variables(global_args, stages[-1])
    user = [i for i in stages[-1].instructions if i.keyword == "USER"][-1]
    return int(check_dockerfile._expand(user.args, variables).split(":")[0])


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    assert dockerfile_uid() > 0


@pytest.mark.parametrize("kustomization", [*APP_KUSTOMIZATIONS, "ui"])
def test_workloads_run_as_non_root(rendered: Docs, kustomization: str) -> None:
    for workload, spec in pod_specs(rendered[kustomization]):
        if kustomization == "ui":
            continue  # third-party dev UI image: its own user
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{kustomization} {workload}: runAsNonRoot"
        assert pod.get("runAsUser", 0) > 0, f"{kustomization} {workload}: runAsUser must be non-zero"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{workload} {container['name']}"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{workload} {container['name']}"
    for workload, spec, container in app_containers(rendered[kustomization]):
        uid = container.get("securityContext", {}).get("runAsUser", spec["securityContext"]["runAsUser"])
        assert uid == dockerfile_uid(), f"{workload}: runAsUser {uid} differs from the image's USER"


@pytest.mark.parametrize("kustomization", APP_KUSTOMIZATIONS)
def test_app_root_filesystem_and_writable_dirs(rendered: Docs, kustomization: str) -> None:
    docs = rendered[kustomization]
    for workload, spec, container in app_containers(docs):
        read_only = container["securityContext"].get("readOnlyRootFilesystem")
        if kustomization in READ_ONLY:
            assert read_only is True, f"{kustomization} {workload}: readOnlyRootFilesystem"
        env = container_env(docs, container)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        writable = ["/tmp"]
        if workload.startswith("Deployment/"):
            writable.append(env["LLM_BACKEND_DATA_DIR"])
        for path in writable:
            assert mounts.get(path) in empty_dirs, f"{kustomization} {workload}: no emptyDir at {path}"


@pytest.mark.parametrize("kustomization", APP_KUSTOMIZATIONS)
def test_graceful_shutdown_fits_the_grace_period(rendered: Docs, kustomization: str) -> None:
    docs = rendered[kustomization]
    spec = app_deployment(docs)["spec"]["template"]["spec"]
    container = app_container(docs)
    pre_stop = container["lifecycle"]["preStop"]
    pause = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else 0
    assert pause >= 5, "preStop should pause so endpoint removal reaches the proxies before SIGTERM"
    graceful = int(container_env(docs, container).get("GRACEFUL_TIMEOUT", "120"))
    assert spec["terminationGracePeriodSeconds"] >= pause + graceful + 10


@pytest.mark.parametrize("kustomization", [*APP_KUSTOMIZATIONS, "ui"])
def test_every_container_has_requests_and_a_memory_limit(rendered: Docs, kustomization: str) -> None:
    for workload, spec in pod_specs(rendered[kustomization]):
        for container in spec["containers"]:
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), f"{workload}"
            assert "memory" in resources.get("limits", {}), f"{workload}"


# --- overlays ---------------------------------------------------------------------------------------------


def test_base_runs_two_replicas(rendered: Docs) -> None:
    assert app_deployment(rendered["base"])["spec"]["replicas"] == 2


def test_dev_runs_one_replica_with_in_cluster_databases(rendered: Docs) -> None:
    docs = rendered["overlays/dev"]
    assert app_deployment(docs)["spec"]["replicas"] == 1
    assert not objects_of(docs, "HorizontalPodAutoscaler")
    assert not objects_of(docs, "PodDisruptionBudget")
    env = container_env(docs, app_container(docs))
    config_map = next(c for c in objects_of(docs, "ConfigMap") if "LOG_LEVEL" in c.get("data", {}))
    assert config_map["data"]["LOG_LEVEL"] == "debug"
    secret = the(docs, "Secret", env["DATABASE_URL"]["secretKeyRef"]["name"])["stringData"]
    services = {s["metadata"]["name"]: s for s in objects_of(docs, "Service")}
    workloads = {d["metadata"]["name"] for d in objects_of(docs, "Deployment")}
    for key, port in (("DATABASE_URL", 5432), ("REDIS_URL", 6379)):
        url = urlsplit(secret[key])
        assert url.hostname in services, f"dev {key} points at {url.hostname}, not an in-cluster Service"
        assert url.hostname in workloads
        assert (url.port or port) in [p["port"] for p in services[url.hostname]["spec"]["ports"]]


def test_prod_uses_external_secrets_and_workload_identity(rendered: Docs) -> None:
    docs = rendered["overlays/prod"]
    assert not objects_of(docs, "Secret"), "prod must not apply the example Secret over the real one"
    deployment = app_deployment(docs)
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    account = the(docs, "ServiceAccount", spec["serviceAccountName"])
    client_id = account["metadata"]["annotations"]["azure.workload.identity/client-id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", client_id)
    env = container_env(docs, app_container(docs))
    for name in ("DATABASE_URL", "REDIS_URL", "LLM_BACKEND_ADMIN_KEY"):
        assert "secretKeyRef" in env[name], f"prod {name} must come from the external Secret"
    image = app_container(docs)["image"]
    assert "/" in image and not image.endswith(":latest"), (
        f"prod image {image} should be a pinned registry tag"
    )
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {"llm-backend"}
    namespace = the(docs, "Namespace", "llm-backend")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
