"""Azure OpenAI-style inbound routes: /openai/deployments/{deployment}/…, for AzureOpenAI clients."""

from __future__ import annotations

from starlette.responses import Response

from llm_backend.api.common import body_and_raw, caller, json_response, resources, to_response

# The Responses API at Azure's deployment-style path (/openai/responses?api-version=…, AzureOpenAI clients):
# the body names the deployment as `model`, as on the other routes.
from llm_backend.api.responses import (  # noqa: F401
    cancel_response,
    count_input_tokens,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from llm_backend.upstream.base import CHAT, COMPLETIONS, EMBEDDINGS


async def _forward(operation: str, deployment: str) -> Response:
    body, raw = body_and_raw()
    res = resources()
    result = await res.proxy.forward(
        operation, body, caller(), raw=raw, model=deployment, azure_style=True, admit=res.admit
    )
    return to_response(result)


async def create_chat_completion(deployment: str) -> Response:
    return await _forward(CHAT, deployment)


async def create_completion(deployment: str) -> Response:
    return await _forward(COMPLETIONS, deployment)


async def create_embedding(deployment: str) -> Response:
    return await _forward(EMBEDDINGS, deployment)


async def list_deployments() -> Response:
    data = [
        {
            "id": m["id"],
            "model": m["id"],
            "object": "deployment",
            "owner": "organization-owner",
            "status": "succeeded",
            "created_at": m["created"],
            "updated_at": m["created"],
            "scale_settings": {"scale_type": "standard"},
        }
        for m in resources().proxy.visible_models(caller())
    ]
    return json_response({"object": "list", "data": data})


async def list_models() -> Response:
    return json_response({"object": "list", "data": resources().proxy.visible_models(caller())})
