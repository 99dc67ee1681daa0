"""/v1/models (and the Azure listings) with each model's context window and prices, read through the real
openai SDK (extra fields appear in `model_extra`), checked against the spec's Model schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import yaml

from llm_backend.config import BackendConfig, ModelConfig, Prices, Settings
from tests.conftest import REPO

SPEC = yaml.safe_load((REPO / "openapi" / "openapi.yaml").read_text(encoding="utf-8"))
MODEL_SCHEMA = SPEC["components"]["schemas"]["Model"]

PRICED = ModelConfig(
    name="gpt-4o",
    aliases=("gpt-4o-latest",),
    backends=(BackendConfig(provider="mock", name="m"),),
    context_window=128000,
    max_output_tokens=16384,
    prices=Prices(input=2.5, cached_input=1.25, output=10.0),
)
WINDOW_ONLY = ModelConfig(
    name="small", backends=(BackendConfig(provider="mock", name="s"),), max_output_tokens=4096
)
PLAIN = ModelConfig(name="plain", backends=(BackendConfig(provider="mock", name="p"),))
STANDARD = {"id", "object", "created", "owned_by"}


@pytest.fixture
def c(make_client: Callable[..., Any]) -> Any:
    return make_client([PRICED, WINDOW_ONLY, PLAIN], admin_key="admin")


def sdk(c: Any, base: str = "http://testserver/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="x", http_client=c, max_retries=0)


def test_list_and_retrieve_through_the_sdk(c: Any) -> None:
    listed = {m.id: m for m in sdk(c).models.list()}
    assert set(listed) == {"gpt-4o", "gpt-4o-latest", "small", "plain"}
    gpt = listed["gpt-4o"]
    assert (gpt.object, gpt.owned_by, gpt.created) == ("model", "llm-backend", 1700000000)
    assert gpt.model_extra == {
        "context_window": 128000,
        "max_output_tokens": 16384,
        "prices": {"input": 2.5, "cached_input": 1.25, "output": 10.0},
        "pricing": {"prompt": "0.0000025", "completion": "0.00001", "input_cache_read": "0.00000125"},
        "context_length": 128000,
        "top_provider": {"context_length": 128000, "max_completion_tokens": 16384},
    }
    assert listed["gpt-4o-latest"].model_extra == gpt.model_extra  # an alias is the same model
    # absent when not configured: no nulls, no zeros
    assert listed["small"].model_extra == {
        "max_output_tokens": 4096,
        "top_provider": {"max_completion_tokens": 4096},
    }
    assert listed["plain"].model_extra == {}
    one = sdk(c).models.retrieve("gpt-4o")
    assert one.id == "gpt-4o" and one.model_extra == gpt.model_extra


def test_every_listing_matches_the_spec_schema(c: Any) -> None:
    for path in ("/v1/models", "/openai/v1/models", "/openai/models?api-version=2024-10-21"):
        r = c.get(path)
        assert r.status_code == 200, (path, r.text)
        for item in r.json()["data"]:
            jsonschema.validate(item, MODEL_SCHEMA)
            assert STANDARD <= set(item)
    for path in ("/v1/models/gpt-4o", "/openai/v1/models/gpt-4o"):
        item = c.get(path).json()
        jsonschema.validate(item, MODEL_SCHEMA)
        assert item["context_window"] == 128000 and item["prices"]["output"] == 10.0


def test_azure_v1_path_through_the_sdk(c: Any) -> None:
    (gpt,) = [m for m in sdk(c, "http://testserver/openai/v1").models.list() if m.id == "gpt-4o"]
    assert gpt.model_extra is not None and gpt.model_extra["pricing"]["completion"] == "0.00001"


def test_per_token_strings_are_exact_decimals(make_client: Callable[..., Any]) -> None:
    odd = ModelConfig(
        name="odd",
        backends=(BackendConfig(provider="mock", name="o"),),
        prices=Prices(input=0.075, cached_input=0.01875, output=1234.5),
    )
    item = make_client([odd]).get("/v1/models/odd").json()
    assert item["pricing"] == {
        "prompt": "0.000000075",
        "completion": "0.0012345",
        "input_cache_read": "0.00000001875",
    }
    assert item["prices"] == {"input": 0.075, "cached_input": 0.01875, "output": 1234.5}


def test_the_demo_models_carry_their_metadata(make_client: Callable[..., Any], tmp_path: Path) -> None:
    settings = Settings.from_env({"LLM_BACKEND_CONFIG": str(REPO / "config" / "demo.yaml")})
    c = make_client(list(settings.models))
    listed = {m.id: m.model_extra or {} for m in sdk(c).models.list()}
    assert listed["gpt-4o"]["context_window"] == 128000 and listed["gpt-4o"]["max_output_tokens"] == 16384
    assert listed["gpt-4o"]["prices"] == {"input": 2.5, "cached_input": 1.25, "output": 10.0}
    assert all("prices" in extra and "context_window" in extra for extra in listed.values()), listed
    # the mock answers with the model's name, so the demo's costs are those of the model asked for
    done = sdk(c).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert done.model == "gpt-4o"
