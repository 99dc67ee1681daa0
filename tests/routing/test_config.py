"""The routing part of the models YAML: parsed into typed config, and every mistake a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_backend.config import BreakerConfig, ConfigError, Timeouts, load_models_file

FULL = """
models:
  - name: gpt-4o
    strategy: weighted
    retries: 2
    fail_over_on: [429, 5xx, timeout]
    circuit_breaker: {failure_threshold: 3, cooldown: 15, failure_rate: 0.25, window: 30, min_requests: 8}
    backends:
      - provider: azure
        name: eastus
        endpoint: https://east.openai.azure.com/
        deployment: gpt-4o-east
        auth: entra_id
        priority: 0
        weight: 3
        timeout: {connect: 2, first_byte: 20, total: 120}
        max_parallel: 16
      - provider: azure
        endpoint: https://west.openai.azure.com
        deployment: gpt-4o-west
        api_key: ${WEST_KEY}
        priority: 1
        timeout: 30
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_full_routing_config_is_parsed(tmp_path: Path) -> None:
    (m,) = load_models_file(write(tmp_path, FULL), {"WEST_KEY": "wk"})
    assert m.strategy == "weighted" and m.retries == 2
    assert m.fail_over_on == ("429", "5xx", "timeout")
    assert m.breaker == BreakerConfig(
        failure_threshold=3, cooldown=15, failure_rate=0.25, window=30, min_requests=8
    )
    east, west = m.backends
    assert (east.name, east.auth, east.api_key, east.priority, east.weight) == (
        "eastus",
        "entra_id",
        None,
        0,
        3.0,
    )
    assert east.endpoint == "https://east.openai.azure.com"
    assert east.timeout == Timeouts(connect=2, first_byte=20, total=120)
    assert east.max_parallel == 16
    assert west.auth == "api_key" and west.api_key == "wk" and west.priority == 1 and west.weight == 1.0
    assert west.name == "gpt-4o@west.openai.azure.com/gpt-4o-west#1"
    assert west.timeout.first_byte == 30 and west.timeout.total == 30 and west.max_parallel is None


def test_defaults(tmp_path: Path) -> None:
    text = """
models:
  - name: m
    backends:
      - {provider: azure, endpoint: "https://x.openai.azure.com", deployment: d, api_key: k}
"""
    (m,) = load_models_file(write(tmp_path, text), {})
    assert m.strategy == "priority" and m.retries == 1
    assert set(m.fail_over_on) == {"connect", "timeout", "429", "5xx"}
    assert m.breaker == BreakerConfig()
    assert m.backends[0].auth == "api_key"


BASE = """
models:
  - name: gpt-4o
{model_extra}
    backends:
      - provider: {provider}
        endpoint: https://east.openai.azure.com
        deployment: d
        base_url: https://api.openai.com/v1
        api_key: k
{backend_extra}
"""

CASES = {
    "unknown strategy": (
        "    strategy: round_robin",
        "",
        "azure",
        "models[0] (gpt-4o).strategy",
        "round_robin",
    ),
    "bad breaker key": (
        "    circuit_breaker: {threshold: 3}",
        "",
        "azure",
        "models[0] (gpt-4o).circuit_breaker",
        "failure_threshold",
    ),
    "breaker not a mapping": (
        "    circuit_breaker: 5",
        "",
        "azure",
        "models[0] (gpt-4o).circuit_breaker",
        "",
    ),
    "breaker threshold 0": (
        "    circuit_breaker: {failure_threshold: 0}",
        "",
        "azure",
        "models[0] (gpt-4o).circuit_breaker.failure_threshold",
        ">= 1",
    ),
    "breaker rate above 1": (
        "    circuit_breaker: {failure_rate: 1.5}",
        "",
        "azure",
        "models[0] (gpt-4o).circuit_breaker.failure_rate",
        "",
    ),
    "negative retries": ("    retries: -1", "", "azure", "models[0] (gpt-4o).retries", ">= 0"),
    "retries not a number": ("    retries: two", "", "azure", "models[0] (gpt-4o).retries", ""),
    "unknown failover condition": (
        "    fail_over_on: [4xx]",
        "",
        "azure",
        "models[0] (gpt-4o).fail_over_on",
        "429",
    ),
    "entra_id on openai": (
        "",
        "        auth: entra_id",
        "openai",
        "models[0] (gpt-4o).backends[0].auth",
        "azure",
    ),
    "unknown auth": (
        "",
        "        auth: password",
        "azure",
        "models[0] (gpt-4o).backends[0].auth",
        "entra_id",
    ),
    "max_parallel 0": (
        "",
        "        max_parallel: 0",
        "azure",
        "models[0] (gpt-4o).backends[0].max_parallel",
        "",
    ),
    "negative weight": ("", "        weight: -1", "azure", "models[0] (gpt-4o).backends[0].weight", ""),
    "priority not a number": (
        "",
        "        priority: high",
        "azure",
        "models[0] (gpt-4o).backends[0].priority",
        "",
    ),
    "bad timeout key": (
        "",
        "        timeout: {read: 5}",
        "azure",
        "models[0] (gpt-4o).backends[0].timeout",
        "first_byte",
    ),
    "zero timeout": (
        "",
        "        timeout: {total: 0}",
        "azure",
        "models[0] (gpt-4o).backends[0].timeout.total",
        "",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_mistakes_are_one_line_config_errors(tmp_path: Path, case: str) -> None:
    model_extra, backend_extra, provider, place, hint = CASES[case]
    path = write(
        tmp_path, BASE.format(model_extra=model_extra, backend_extra=backend_extra, provider=provider)
    )
    with pytest.raises(ConfigError) as info:
        load_models_file(path, {})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert place in message, message
    assert hint in message, message


def test_azure_entra_id_needs_no_api_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, BASE.format(model_extra="", backend_extra="        auth: entra_id", provider="azure")
    )
    (m,) = load_models_file(path, {})
    assert m.backends[0].auth == "entra_id"
    text = """
models:
  - name: m
    backends:
      - {provider: azure, endpoint: "https://x.openai.azure.com", deployment: d}
"""
    with pytest.raises(ConfigError, match=r"backends\[0\]\.api_key.*entra_id"):
        load_models_file(write(tmp_path, text), {})


def test_duplicate_backend_names_in_a_model(tmp_path: Path) -> None:
    text = """
models:
  - name: m
    backends:
      - {provider: mock, name: a}
      - {provider: mock, name: a}
"""
    with pytest.raises(ConfigError, match=r"models\[0\] \(m\).*unique"):
        load_models_file(write(tmp_path, text), {})


def test_max_parallel_true_is_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path, BASE.format(model_extra="", backend_extra="        max_parallel: true", provider="azure")
    )
    with pytest.raises(ConfigError, match=r"max_parallel"):
        load_models_file(path, {})
