"""Configuration: the models YAML (${ENV}, aliases, one-line errors), the environment simple case, secrets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest
from pytest_httpserver import HTTPServer

from llm_backend.app import create_app
from llm_backend.config import ConfigError, Settings, Timeouts, load_models_file

GOOD_YAML = """\
models:
  - name: gpt-4o                 # what clients send as "model"
    aliases: [gpt-4]
    backends:
      - provider: azure
        endpoint: https://eastus-res.openai.azure.com/
        deployment: gpt-4o-prod
        api_version: "2024-10-21"
        api_key: ${AZURE_OPENAI_API_KEY}
      - provider: openai
        base_url: ${OPENAI_BASE_URL:-https://api.openai.com/v1}
        api_key: ${OPENAI_API_KEY}
        model: gpt-4o-2024-08-06
        timeout: {connect: 2, first_byte: 5, total: 30}
  - name: mock
    aliases: [gpt-3.5-turbo, gpt-35-turbo]
    backends:
      - provider: mock
        delay_ms: 0
"""
ENV = {"AZURE_OPENAI_API_KEY": "az-secret-1", "OPENAI_API_KEY": "oa-secret-2"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_models_file(path, env or {})
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    assert message.startswith(str(path)), "config errors name the file"
    return message


def test_yaml_with_env_interpolation_and_aliases(tmp_path: Path) -> None:
    models = load_models_file(write(tmp_path, GOOD_YAML), ENV)
    assert [m.name for m in models] == ["gpt-4o", "mock"]
    gpt4o, mock = models
    assert gpt4o.aliases == ("gpt-4",)
    assert mock.aliases == ("gpt-3.5-turbo", "gpt-35-turbo")
    azure, oai = gpt4o.backends
    assert azure.provider == "azure"
    assert azure.endpoint == "https://eastus-res.openai.azure.com"
    assert azure.deployment == "gpt-4o-prod" and azure.api_version == "2024-10-21"
    assert azure.api_key == "az-secret-1"
    assert oai.base_url == "https://api.openai.com/v1" and oai.api_key == "oa-secret-2"
    assert oai.model == "gpt-4o-2024-08-06"
    assert oai.timeout == Timeouts(connect=2, first_byte=5, total=30)
    assert azure.name != oai.name
    assert mock.backends[0].provider == "mock" and mock.backends[0].delay_ms == 0


def test_interpolation_default_is_overridden_by_env(tmp_path: Path) -> None:
    models = load_models_file(write(tmp_path, GOOD_YAML), {**ENV, "OPENAI_BASE_URL": "http://local:1234/v1/"})
    assert models[0].backends[1].base_url == "http://local:1234/v1"


def test_from_env_reads_the_file_named_by_llm_backend_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_YAML)
    settings = Settings.from_env(
        {"LLM_BACKEND_CONFIG": str(path), **ENV, "LLM_BACKEND_AUTH": "none", "PORT": "9000"}
    )
    assert settings.config_source == str(path)
    assert [m.name for m in settings.models] == ["gpt-4o", "mock"]
    assert settings.auth == "none" and settings.port == 9000


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "LLM_BACKEND_CONFIG": str(write(tmp_path, GOOD_YAML)),
            **ENV,
            "LLM_BACKEND_ADMIN_KEY": "admin-secret-3",
        }
    )
    for text in (repr(settings), str(settings), repr(settings.models), repr(settings.models[0].backends[0])):
        assert "az-secret-1" not in text
        assert "oa-secret-2" not in text
        assert "admin-secret-3" not in text
    assert "***" in repr(settings.models[0].backends[0])


@pytest.mark.parametrize(
    ("yaml_text", "env", "must_contain"),
    [
        pytest.param(
            "models:\n  - name: m\n    backends:\n      - provider: bedrock\n",
            {},
            ["models[0] (m).backends[0].provider", "'bedrock'", "azure, openai, mock"],
            id="unknown-provider",
        ),
        pytest.param(
            "models:\n  - name: m\n    backends:\n      - provider: azure\n"
            "        endpoint: https://x.openai.azure.com\n        deployment: d\n",
            {},
            ["models[0] (m).backends[0].api_key", "api_key"],
            id="missing-api-key",
        ),
        pytest.param(
            "models:\n  - name: m\n    backends:\n      - provider: azure\n"
            "        endpoint: https://x.openai.azure.com\n        deployment: d\n        api_key: ${NOT_SET_ANYWHERE}\n",
            {},
            ["models[0] (m).backends[0]", "NOT_SET_ANYWHERE", "export NOT_SET_ANYWHERE"],
            id="unset-env-var",
        ),
        pytest.param(
            "models:\n  - name: a\n    backends: [{provider: mock}]\n  - name: a\n    backends: [{provider: mock}]\n",
            {},
            ["'a'", "unique"],
            id="duplicate-names",
        ),
        pytest.param(
            "models:\n  - name: a\n    aliases: [gpt-4]\n    backends: [{provider: mock}]\n"
            "  - name: gpt-4\n    backends: [{provider: mock}]\n",
            {},
            ["'gpt-4'", "unique"],
            id="alias-clashes-with-name",
        ),
        pytest.param(
            "models:\n  - name: a\n    backends:\n      - provider: azure\n        deployment: d\n        api_key: k\n",
            {},
            ["models[0] (a).backends[0].endpoint"],
            id="azure-without-endpoint",
        ),
        pytest.param(
            "models:\n  - name: a\n    backends: []\n",
            {},
            ["models[0] (a)", "backends"],
            id="no-backends",
        ),
        pytest.param(
            "models:\n  - name: a\n    backend: [{provider: mock}]\n",
            {},
            ["models[0] (a)", "backend"],
            id="misspelled-key",
        ),
        pytest.param("models: []\n", {}, ["models"], id="empty-models"),
    ],
)
def test_config_errors_are_one_line_naming_file_and_place(
    tmp_path: Path, yaml_text: str, env: dict[str, str], must_contain: list[str]
) -> None:
    message = config_error(write(tmp_path, yaml_text), env)
    for part in must_contain:
        assert part in message, message


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    text = "models:\n  - name: a\n    backends:\n      - provider: mock\n     bad: [unclosed\n"
    message = config_error(write(tmp_path, text))
    assert "line 5" in message and "YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LLM_BACKEND_CONFIG": str(tmp_path / "absent.yaml")})
    assert str(tmp_path / "absent.yaml") in str(info.value)
    assert "LLM_BACKEND_CONFIG" in str(info.value)


def test_env_simple_azure_case() -> None:
    settings = Settings.from_env(
        {
            "AZURE_OPENAI_ENDPOINT": "https://eastus-res.openai.azure.com/",
            "AZURE_OPENAI_API_KEY": "az-key",
            "AZURE_OPENAI_DEPLOYMENTS": "gpt-4o, gpt-35-turbo,gpt-4=gpt-4-prod",
            "OPENAI_API_VERSION": "2024-06-01",
        }
    )
    assert [m.name for m in settings.models] == ["gpt-4o", "gpt-35-turbo", "gpt-4"]
    backends = [m.backends[0] for m in settings.models]
    assert [b.deployment for b in backends] == ["gpt-4o", "gpt-35-turbo", "gpt-4-prod"]
    assert all(b.provider == "azure" for b in backends)
    assert all(b.endpoint == "https://eastus-res.openai.azure.com" for b in backends)
    assert all(b.api_key == "az-key" and b.api_version == "2024-06-01" for b in backends)
    assert "az-key" not in repr(settings)


def test_env_azure_default_api_version_and_missing_key() -> None:
    settings = Settings.from_env(
        {
            "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com",
            "AZURE_OPENAI_API_KEY": "k",
            "AZURE_OPENAI_DEPLOYMENTS": "d",
        }
    )
    assert settings.models[0].backends[0].api_version == "2024-10-21"
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com", "AZURE_OPENAI_DEPLOYMENTS": "d"}
        )
    assert "AZURE_OPENAI_API_KEY" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env(
            {"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com", "AZURE_OPENAI_API_KEY": "k"}
        )
    assert "AZURE_OPENAI_DEPLOYMENTS" in str(info.value)


def test_env_openai_case() -> None:
    wildcard = Settings.from_env({"OPENAI_API_KEY": "sk-1"})
    (model,) = wildcard.models
    assert model.wildcard and model.backends[0].base_url == "https://api.openai.com/v1"
    assert model.backends[0].api_key == "sk-1"
    named = Settings.from_env(
        {"OPENAI_BASE_URL": "http://localhost:11434/v1/", "OPENAI_MODELS": "llama3,qwen2"}
    )
    assert [m.name for m in named.models] == ["llama3", "qwen2"]
    assert all(m.backends[0].base_url == "http://localhost:11434/v1" for m in named.models)


def test_no_config_at_all_names_llm_backend_config() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({})
    message = str(info.value)
    assert "LLM_BACKEND_CONFIG" in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("LOG_FORMAT", "xml"),
        ("LLM_BACKEND_RECORDING", "maybe"),
        ("TRUSTED_PROXIES", "1.2.3"),
    ],
)
def test_bad_env_values(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"OPENAI_API_KEY": "k", name: value})
    assert name in str(info.value)


def test_yaml_config_serves_through_an_alias(tmp_path: Path) -> None:
    settings = Settings.from_env({"LLM_BACKEND_CONFIG": str(write(tmp_path, GOOD_YAML)), **ENV})
    settings = dataclasses.replace(
        settings, auth="none", recording=False, database_url=f"sqlite:///{tmp_path}/t.db", data_dir=tmp_path
    )
    with create_app(settings).test_client() as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": "gpt-35-turbo", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 200, r.text
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["gpt-4o", "gpt-4", "mock", "gpt-3.5-turbo", "gpt-35-turbo"]


def test_env_wildcard_openai_forwards_any_model(tmp_path: Path, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/v1/chat/completions").respond_with_json(
        {"id": "x", "object": "chat.completion"}
    )
    settings = Settings.from_env({"OPENAI_BASE_URL": httpserver.url_for("/v1"), "OPENAI_API_KEY": "sk-up"})
    settings = dataclasses.replace(
        settings, auth="none", recording=False, database_url=f"sqlite:///{tmp_path}/t.db", data_dir=tmp_path
    )
    with create_app(settings).test_client() as client:
        sent = orjson.dumps({"model": "any-model-name", "messages": [{"role": "user", "content": "x"}]})
        r = client.post("/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    req = httpserver.log[0][0]
    assert req.get_data() == sent
    assert req.headers["Authorization"] == "Bearer sk-up"
