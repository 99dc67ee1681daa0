"""The real openai SDK with an access token of the test issuer as its api_key, against gunicorn with two
workers configured from the environment (as deployed): chat JSON and stream, the AzureOpenAI client with
the token as its azure_ad_token, and an expired token as the SDK's AuthenticationError."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import gunicorn_server
from tests.oidc.support import AUDIENCE, Issuer, request_log

ADA = "0a0a0a0a-0000-4000-8000-00000000ada0"
MODELS_YAML = "models:\n  - name: m\n    backends:\n      - provider: mock\n        delay_ms: 1\n"


@pytest.mark.slow
def test_openai_sdk_with_a_jwt_as_api_key(issuer: Issuer, tmp_path: Path, db_url: str) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(MODELS_YAML, encoding="utf-8")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "DATABASE_URL": db_url,
        "LLM_BACKEND_AUTH": "keys",
        "LLM_BACKEND_CONFIG": str(config),
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "WEB_CONCURRENCY": "2",
        "LOG_LEVEL": "WARNING",
        "OIDC_ISSUER": issuer.issuer,
        "OIDC_AUDIENCE": f"{AUDIENCE}, other-app-id",
    }
    token = issuer.token()
    with gunicorn_server(env, tmp_path / "gunicorn.log") as (_, url):
        client = openai.OpenAI(api_key=token, base_url=f"{url}/v1", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi there"}])
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Stream this"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text
        azure = openai.AzureOpenAI(
            azure_endpoint=url, azure_ad_token=token, api_version="2024-10-21", max_retries=0, timeout=60
        )
        reply = azure.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Azure style"}]
        )
        assert reply.choices[0].message.content
        expired = openai.OpenAI(
            api_key=issuer.token(exp=int(time.time()) - 3600), base_url=f"{url}/v1", max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as refused:
            expired.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        body: Any = refused.value.body
        assert "expired" in body["message"] and body["code"] == "invalid_api_key"
        models = client.models.list()
        assert [m.id for m in models.data] == ["m"]
    rows = request_log(db_url)
    assert len(rows) == 3
    assert {r["user"] for r in rows} == {ADA} and all(r["user_id"] for r in rows)
    assert {r["stream"] for r in rows} == {True, False}
    # two workers: each loads the keys once, none per request
    assert 1 <= issuer.jwks_fetches <= 2
