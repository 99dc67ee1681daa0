"""Entra ID on Azure's v1 API: the token of the v1 scope reaches {endpoint}/openai/v1/… as a Bearer token."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from llm_backend.config import ModelConfig
from llm_backend.upstream import identity
from llm_backend.upstream.identity import SCOPE, V1_SCOPE
from tests.responses.conftest import MODEL, PREVIEW, Upstream, azure, json_reply, response_object


class Credential:
    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kw: Any) -> Any:
        self.scopes.append(scopes)
        return SimpleNamespace(token=f"tok-for-{scopes[0]}", expires_on=time.time() + 3600)

    async def close(self) -> None:
        return None


@pytest.fixture
def credential(monkeypatch: pytest.MonkeyPatch) -> Credential:
    cred = Credential()
    monkeypatch.setattr(identity, "make_credential", lambda: cred)
    return cred


def test_v1_backend_asks_for_the_v1_scope_and_deployment_style_keeps_its_own(
    upstream: Upstream, make_app: Callable[..., Any], credential: Credential
) -> None:
    upstream.on("/openai/v1/responses", lambda r: json_reply(response_object()))
    upstream.on("/openai/responses", lambda r: json_reply(response_object()))
    v1 = ModelConfig(name=MODEL, backends=(azure(upstream.server, auth="entra_id", api_key=None),))
    dated = ModelConfig(
        name="dated",
        backends=(azure(upstream.server, "old", auth="entra_id", api_key=None, api_version=PREVIEW),),
    )
    with make_app(v1, dated).test_client() as c:
        for model in (MODEL, MODEL, "dated"):
            assert c.post("/v1/responses", json={"model": model, "input": "hi"}).status_code == 200
    sent = [(q.path, q.headers.get("Authorization"), "api-key" in q.headers) for q in upstream.requests]
    assert sent == [
        ("/openai/v1/responses", f"Bearer tok-for-{V1_SCOPE}", False),
        ("/openai/v1/responses", f"Bearer tok-for-{V1_SCOPE}", False),
        ("/openai/responses", f"Bearer tok-for-{SCOPE}", False),
    ]
    assert sorted(credential.scopes) == sorted([(V1_SCOPE,), (SCOPE,)]), "one token per scope, reused"


def test_token_scope_can_be_set(
    upstream: Upstream, make_app: Callable[..., Any], credential: Credential
) -> None:
    upstream.on("/openai/v1/responses", lambda r: json_reply(response_object()))
    custom = "https://cognitiveservices.azure.com/.default"
    model = ModelConfig(
        name=MODEL, backends=(azure(upstream.server, auth="entra_id", api_key=None, token_scope=custom),)
    )
    with make_app(model).test_client() as c:
        assert c.post("/v1/responses", json={"model": MODEL, "input": "hi"}).status_code == 200
    assert upstream.requests[0].headers["Authorization"] == f"Bearer tok-for-{custom}"
