"""Keys, model lists and limits apply to the Responses API as to chat; the reservation uses max_output_tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_backend.config import BackendConfig, ModelConfig
from llm_backend.services.operations import RESPONSES_OP
from tests.conftest import assert_openai_error
from tests.responses.conftest import MODEL

ADMIN = {"Authorization": "Bearer adm"}


def _app(make_app: Callable[..., Any]) -> Any:
    models = [
        ModelConfig(name=name, backends=(BackendConfig(provider="mock", name=f"{name}-mock", delay_ms=0),))
        for name in (MODEL, "other")
    ]
    return make_app(*models, auth="keys", admin_key="adm")


def _key(c: Any, **fields: Any) -> dict[str, str]:
    r = c.post("/admin/keys", json={"name": "team", **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def test_limits_reserve_max_output_tokens_and_refuse_past_the_rpm(make_app: Callable[..., Any]) -> None:
    with _app(make_app).test_client() as c:
        tpm = 100_000
        key = _key(c, rpm=2, tpm=tpm)
        body = {"model": MODEL, "input": "Count my tokens please", "max_output_tokens": 300}
        first = c.post("/v1/responses", json=body, headers=key)
        assert first.status_code == 200, first.text
        reserved = RESPONSES_OP.reserve(body, 1024)
        assert reserved >= 300 and reserved < 1024, "max_output_tokens, not DEFAULT_MAX_TOKENS"
        remaining = int(first.headers["x-ratelimit-remaining-tokens"])
        assert tpm - reserved <= remaining <= tpm - reserved + 2
        assert c.post("/openai/v1/responses", json=body, headers=key).status_code == 200
        refused = c.post("/v1/responses", json=body, headers=key)
        assert_openai_error(refused, 429, code="rate_limit_exceeded")
        assert "Retry-After" in refused.headers
        stored = c.get(f"/v1/responses/{first.json()['id']}", headers=key)
        assert_openai_error(stored, 429)  # calls on a stored response count as requests too


def test_model_lists_and_unknown_keys(make_app: Callable[..., Any]) -> None:
    with _app(make_app).test_client() as c:
        only_other = _key(c, models=["other"])
        assert_openai_error(
            c.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers=only_other),
            404,
            code="model_not_found",
        )
        ok = c.post("/v1/responses", json={"model": "other", "input": "hi"}, headers=only_other)
        assert ok.status_code == 200
        assert_openai_error(
            c.post(
                "/v1/responses", json={"model": MODEL, "input": "hi"}, headers={"Authorization": "Bearer no"}
            ),
            401,
        )
        assert_openai_error(c.post("/openai/v1/responses", json={"model": MODEL, "input": "hi"}), 401)
