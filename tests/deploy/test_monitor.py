"""The prod overlay's ServiceMonitor scrapes the app's Service with the metrics token the pods require."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy.support import the
from tests.deploy.test_render import validate_custom

Docs = dict[str, list[dict[str, Any]]]


def metrics_token_source(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = the(docs, "Deployment", "llm-backend")
    container = next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "llm-backend"
    )
    env = next(e for e in container["env"] if e["name"] == "METRICS_TOKEN")
    return dict(env["valueFrom"]["secretKeyRef"])


def test_prod_monitor_scrapes_the_service_with_the_metrics_token(rendered: Docs) -> None:
    docs = rendered["overlays/prod"]
    monitor = the(docs, "ServiceMonitor", "llm-backend")
    service = the(docs, "Service", "llm-backend")
    assert (
        monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    )  # the Secret is read from there
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    source = metrics_token_source(docs)
    assert (credentials["name"], credentials["key"]) == (source["name"], source["key"])


def test_only_prod_needs_the_operator(rendered: Docs) -> None:
    for name in ("base", "overlays/dev"):
        assert not [d for d in rendered[name] if d["apiVersion"].startswith("monitoring.coreos.com/")]


def test_the_offline_schema_refuses_mistakes(rendered: Docs) -> None:
    monitor = the(rendered["overlays/prod"], "ServiceMonitor", "llm-backend")
    validate_custom(monitor)
    misspelt = copy.deepcopy(monitor)
    misspelt["spec"]["endpoints"][0]["bearerTokenSecrets"] = {"key": "METRICS_TOKEN"}
    wrong = copy.deepcopy(monitor)
    wrong["spec"]["endpoints"][0]["interval"] = "30 seconds"
    for broken in (misspelt, wrong):
        with pytest.raises(pytest.fail.Exception):
            validate_custom(broken)
