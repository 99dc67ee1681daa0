"""The demo (config/demo.yaml): distinct mock models, so a key's model list visibly restricts what it may call."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from llm_backend.config import Settings
from tests.demo_server import DEMO_CONFIG, demo_server

CHAT_MODELS = {"gpt-4o", "gpt-4", "gpt-35-turbo"}
#: Every name the demo answered to before it had distinct models; each must still work.
OLD_NAMES = ["mock-gpt", "gpt-4", "gpt-4o", "gpt-35-turbo", "gpt-3.5-turbo", "gpt-4-32k"]
EMBEDDING_NAMES = ["text-embedding-3-small", "text-embedding-ada-002", "mock-embedding"]


def test_the_demo_has_distinct_models_and_keeps_the_old_names():
    models = Settings.from_env({"LLM_BACKEND_CONFIG": str(DEMO_CONFIG)}).models
    by_name = {m.name: m for m in models}
    assert CHAT_MODELS | {"text-embedding-3-small"} == set(by_name)
    names = {n for m in models for n in (m.name, *m.aliases)}
    assert set(OLD_NAMES + EMBEDDING_NAMES) <= names
    # gpt-4o and gpt-4 are not two names of one model: an allow-list can tell them apart
    owner = {n: m.name for m in models for n in (m.name, *m.aliases)}
    assert len({owner["gpt-4o"], owner["gpt-4"], owner["gpt-35-turbo"]}) == 3


@pytest.mark.slow
def test_a_key_created_with_models_gpt_4o_is_refused_gpt_4(tmp_path: Path):
    with demo_server(tmp_path, LLM_BACKEND_AUTH="keys") as demo:
        created = demo.cli("keys", "create", "--name", "team-a", "--models", "gpt-4o")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        assert key.startswith("sk-llmb-")

        client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key=key, max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]
        reply = client.chat.completions.create(model="gpt-4o", messages=messages)
        assert reply.choices[0].message.content
        for other in ("gpt-4", "gpt-35-turbo", "mock-gpt"):
            with pytest.raises(openai.NotFoundError) as info:
                client.chat.completions.create(model=other, messages=messages)
            assert info.value.code == "model_not_found", info.value.body
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="a")
        assert [m.id for m in client.models.list()] == ["gpt-4o"]

        # the same through curl's eyes: the status codes themselves
        h = {"Authorization": f"Bearer {key}"}
        ask = {"messages": messages}
        assert httpx.post(
            f"{demo.url}/v1/chat/completions", json={**ask, "model": "gpt-4o"}, headers=h
        ).is_success
        refused = httpx.post(f"{demo.url}/v1/chat/completions", json={**ask, "model": "gpt-4"}, headers=h)
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["code"] == "model_not_found"

        # a key without --models may call every demo model, the embedding one included
        everything = demo.cli("keys", "create", "--name", "team-b").stdout.strip().splitlines()[-1]
        full = openai.OpenAI(base_url=f"{demo.url}/v1", api_key=everything, max_retries=0)
        for name in OLD_NAMES:
            assert full.chat.completions.create(model=name, messages=messages).choices[0].message.content
        for name in EMBEDDING_NAMES:
            assert full.embeddings.create(model=name, input=["a", "b"]).data[1].embedding
        assert {m.id for m in full.models.list()} == set(
            OLD_NAMES + EMBEDDING_NAMES
        )  # aliases are listed too
