"""Model metadata in the models file: context_window, max_output_tokens and prices, their validation, and
what `llm-backend check-config` says about them; the exact cost arithmetic and the answering-model lookup."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from llm_backend.config import ConfigError, ModelConfig, Prices, load_models_file, models_from_env
from llm_backend.services.pricing import PriceBook, cost_decimal, cost_of, round_cost
from tests.test_cli_ux import run

HEAD = """\
models:
  - name: gpt-4o
    aliases: [gpt-4o-latest]
"""
MOCK = """\
    backends:
      - provider: mock
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, HEAD + body + MOCK)
    with pytest.raises(ConfigError) as info:
        load_models_file(path, env or {})
    assert all(p.startswith(f"{path}: models[0] (gpt-4o)") for p in info.value.problems), info.value.problems
    return list(info.value.problems)


def test_metadata_and_prices_are_read(tmp_path: Path) -> None:
    body = """\
    context_window: 128000
    max_output_tokens: 16384
    prices: {input: 2.50, cached_input: 1.25, output: 10.00}
"""
    (model,) = load_models_file(write(tmp_path, HEAD + body + MOCK), {})
    assert model.context_window == 128000
    assert model.max_output_tokens == 16384
    assert model.prices == Prices(input=2.5, cached_input=1.25, output=10.0)


def test_everything_is_optional_and_cached_input_defaults_to_input(tmp_path: Path) -> None:
    (plain,) = load_models_file(write(tmp_path, HEAD + MOCK), {})
    assert (plain.context_window, plain.max_output_tokens, plain.prices) == (None, None, None)
    (model,) = load_models_file(write(tmp_path, HEAD + "    prices: {input: 30, output: 60}\n" + MOCK), {})
    assert model.prices == Prices(input=30.0, cached_input=30.0, output=60.0)
    (free,) = load_models_file(write(tmp_path, HEAD + "    prices: {input: 0, output: 0}\n" + MOCK), {})
    assert free.prices == Prices(0.0, 0.0, 0.0)


def test_prices_from_the_environment_by_interpolation(tmp_path: Path) -> None:
    body = "    context_window: ${WINDOW}\n    prices: {input: '${IN:-0.15}', output: '${OUT}'}\n"
    (model,) = load_models_file(write(tmp_path, HEAD + body + MOCK), {"OUT": "0.60", "WINDOW": "128000"})
    assert model.prices == Prices(0.15, 0.15, 0.6)
    assert model.context_window == 128000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("    prices: {input: 2.5, cached_inptu: 1.25, output: 10}\n", "prices.cached_inptu: unknown key; did you mean 'cached_input'?"),
        ("    prices: {inpt: 2.5, output: 10}\n", "prices.inpt: unknown key; did you mean 'input'?"),
        ("    price: {input: 2.5, output: 10}\n", "price: unknown key; did you mean 'prices'?"),
        ("    context_windw: 8192\n", "context_windw: unknown key; did you mean 'context_window'?"),
        ("    max_output_token: 8192\n", "max_output_token: unknown key; did you mean 'max_output_tokens'?"),
        ("    prices: {input: -1, output: 10}\n", "prices.input: a price cannot be negative (-1)"),
        ("    prices: {input: 2.5, output: ten}\n", "prices.output: expected a price per million tokens (a number >= 0), not 'ten'"),
        ("    prices: {input: '$2.50', output: 10}\n", "without a currency sign"),
        ("    prices: {input: .nan, output: 10}\n", "prices.input: expected a price per million tokens"),
        ("    prices: {input: .inf, output: 10}\n", "prices.input: expected a price per million tokens"),
        ("    prices: {input: true, output: 10}\n", "prices.input: expected a price per million tokens"),
        ("    prices: {input: [1], output: 10}\n", "prices.input: expected a price per million tokens"),
        ("    prices: {input: 2.5}\n", "prices: 'output' is missing"),
        ("    prices: {output: 2.5}\n", "prices: 'input' is missing"),
        ("    prices: 2.5\n", "prices: expected a mapping of input, cached_input and output"),
        ("    context_window: -5\n", "context_window: expected a whole number of tokens >= 1, not -5"),
        ("    context_window: 0\n", "context_window: expected a whole number of tokens >= 1, not 0"),
        ("    context_window: 12.5\n", "context_window: expected a whole number of tokens >= 1, not 12.5"),
        ("    context_window: big\n", "context_window: expected a whole number of tokens >= 1, not 'big'"),
        ("    max_output_tokens: true\n", "max_output_tokens: expected a whole number of tokens >= 1, not True"),
        ("    context_window: 4096\n    max_output_tokens: 8192\n", "max_output_tokens: 8192 is more than context_window (4096)"),
    ],
)  # fmt: skip
def test_bad_metadata_is_one_problem_at_its_place(tmp_path: Path, body: str, expected: str) -> None:
    found = problems(tmp_path, body)
    assert len(found) == 1, found
    assert expected in found[0], found[0]


def test_a_misspelt_price_key_is_not_also_reported_missing(tmp_path: Path) -> None:
    # one line for the typo, none for the 'input' it meant
    (line,) = problems(tmp_path, "    prices: {inptu: 1, output: 2}\n")
    assert "did you mean 'input'" in line


def test_every_problem_of_a_file_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, "    context_window: 0\n    prices: {input: -1, output: x, cachd_input: 1}\n")
    assert len(found) == 4, found


def test_env_configured_models_have_no_metadata() -> None:
    env = {"OPENAI_API_KEY": "k", "OPENAI_MODELS": "gpt-4o"}
    (model,) = models_from_env(env)
    assert (model.context_window, model.max_output_tokens, model.prices) == (None, None, None)


def test_check_config_shows_the_metadata(tmp_path: Path) -> None:
    body = "    context_window: 128000\n    max_output_tokens: 16384\n    prices: {input: 2.5, cached_input: 1.25, output: 10}\n"
    path = write(tmp_path, HEAD + body + MOCK + "  - name: plain\n" + MOCK)
    done = run("check-config", str(path))
    assert done.returncode == 0, done.stderr
    header, first, second = done.stdout.splitlines()[:3]
    assert "context" in header and "max_output" in header and "per 1M in/cached/out" in header
    assert "128000" in first and "16384" in first and "2.5/1.25/10" in first
    assert "128000" not in second and "/" not in second.split()[-1]
    as_json = run("check-config", "--json", str(path))
    models = json.loads(as_json.stdout)["models"]
    assert models[0]["context_window"] == 128000
    assert models[0]["max_output_tokens"] == 16384
    assert models[0]["prices"] == {"input": 2.5, "cached_input": 1.25, "output": 10.0}
    assert "prices" not in models[1] and "context_window" not in models[1]


def test_check_config_reports_bad_prices(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "    prices: {input: -2.5, outptu: 10}\n" + MOCK)
    done = run("check-config", str(path))
    assert done.returncode != 0
    assert f"{path}: models[0] (gpt-4o).prices.input: a price cannot be negative" in done.stderr
    assert f"{path}: models[0] (gpt-4o).prices.outptu: unknown key; did you mean 'output'?" in done.stderr


def test_plain_file_check_config_table_is_unchanged(tmp_path: Path) -> None:
    done = run("check-config", str(write(tmp_path, HEAD + MOCK)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == [
        "model",
        "aliases",
        "strategy",
        "backend",
        "provider",
        "target",
    ]


# -- arithmetic ----------------------------------------------------------------------------------------

GPT_4O = Prices(input=2.5, cached_input=1.25, output=10.0)


def test_cost_is_exact_decimal_arithmetic() -> None:
    # 1000 prompt tokens of which 400 cached, 200 completion (reasoning included):
    # 600 * 2.5 + 400 * 1.25 + 200 * 10 = 1500 + 500 + 2000 = 4000 per million = 0.004
    exact = cost_decimal(GPT_4O, prompt_tokens=1000, completion_tokens=200, cached_tokens=400)
    assert exact == Decimal("0.004")
    assert cost_of(GPT_4O, prompt_tokens=1000, completion_tokens=200, cached_tokens=400) == 0.004
    # prices whose float sums drift: 0.1 + 0.2 style; 3 tokens at 0.1 is 0.3 exactly, not 0.30000000000000004
    tenth = Prices(input=0.1, cached_input=0.1, output=0.2)
    assert cost_decimal(tenth, prompt_tokens=1, completion_tokens=1) == Decimal("0.0000003")
    assert cost_of(tenth, prompt_tokens=1, completion_tokens=1) == 3e-7
    assert 0.1 / 1e6 + 0.2 / 1e6 != 3e-7  # what naive float arithmetic would have stored


def test_cached_tokens_are_not_billed_twice_and_never_exceed_the_prompt() -> None:
    assert cost_of(GPT_4O, prompt_tokens=100, completion_tokens=0, cached_tokens=100) == 100 * 1.25 / 1e6
    # a provider reporting more cached than prompt tokens: billed as all cached, never negative
    assert cost_of(GPT_4O, prompt_tokens=100, completion_tokens=0, cached_tokens=500) == 100 * 1.25 / 1e6
    assert cost_of(GPT_4O, prompt_tokens=None, completion_tokens=None, cached_tokens=None) == 0.0


def test_round_cost_removes_float_noise_of_sums() -> None:
    assert round_cost(0.1 + 0.2) == 0.3
    assert round_cost(None) is None
    assert str(round_cost(-0.0)) == "0.0"


# -- the model that answered ----------------------------------------------------------------------------


def model(name: str, *aliases: str, prices: Prices | None = None) -> ModelConfig:
    return ModelConfig(name=name, backends=(), aliases=aliases, prices=prices)


NANO = Prices(0.1, 0.025, 0.4)
MINI = Prices(0.15, 0.075, 0.6)
ROUTER = Prices(1.0, 1.0, 1.0)
BOOK = PriceBook(
    [
        model("gpt-4o", "gpt4o", prices=GPT_4O),
        model("gpt-4o-mini", prices=MINI),
        model("gpt-4.1-nano", prices=NANO),
        model("model-router", prices=ROUTER),
        model("unpriced"),
        ModelConfig(name="*", backends=(), wildcard=True, prices=Prices(9, 9, 9)),
    ]
)


@pytest.mark.parametrize(
    ("answered", "requested", "expected"),
    [
        ("gpt-4o", "gpt-4o", GPT_4O),
        ("gpt4o", "model-router", GPT_4O),  # an alias
        ("GPT-4o", "model-router", GPT_4O),  # case aside
        ("gpt-4o-2024-08-06", "gpt-4o", GPT_4O),  # Azure names the snapshot of a gpt-4o deployment
        ("gpt-4o-mini-2024-07-18", "gpt-4o", MINI),  # the longest name wins
        ("gpt-4.1-nano-2025-04-14", "model-router", NANO),  # the model router's pick
        ("gpt-4o-0513", "model-router", GPT_4O),
        ("gpt-4o-v2", "model-router", GPT_4O),
        ("gpt-4o-2024-08-06-v1", "model-router", GPT_4O),
        ("gpt-4o-audio-preview", "model-router", ROUTER),  # another model, not a snapshot: the routed one's
        ("gpt-5-2025-08-07", "model-router", ROUTER),  # not configured: the routed model's prices
        ("unpriced", "model-router", ROUTER),  # configured without prices: the routed model's prices
        (None, "gpt-4o-mini", MINI),  # no model in the answer
        ("", "gpt-4o-mini", MINI),
        ("anything", "*", None),  # the wildcard's prices never apply by name
        ("whatever", "unpriced", None),
        ("whatever", None, None),
    ],
)
def test_prices_of_the_model_that_answered(
    answered: str | None, requested: str | None, expected: Prices | None
) -> None:
    assert BOOK.prices_for(answered=answered, requested=requested) == expected


def test_prices_for_a_routed_model_config() -> None:
    wildcard = ModelConfig(name="*", backends=(), wildcard=True, prices=Prices(9, 9, 9))
    assert BOOK.prices_for(answered="unknown-model", requested=wildcard) == Prices(9, 9, 9)
    assert (
        BOOK.cost(
            answered="gpt-4o-2024-08-06",
            requested="x",
            prompt_tokens=1000,
            completion_tokens=100,
            cached_tokens=0,
        )
        == 0.0035
    )
    assert (
        BOOK.cost(answered="x", requested="unpriced", prompt_tokens=1, completion_tokens=1, cached_tokens=0)
        is None
    )


def test_an_unset_variable_in_a_price_is_said_once(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "    prices: {input: '${PRICE_IN}', output: 1}\n")
    assert "prices.input: uses ${PRICE_IN} but PRICE_IN is not set" in line
