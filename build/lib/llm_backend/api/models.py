"""GET /v1/models and /v1/models/{model}: only the models the caller may use."""

from __future__ import annotations

from starlette.responses import Response

from llm_backend.api.common import caller, json_response, resources
from llm_backend.errors import ModelNotFound


async def list_models() -> Response:
    return json_response({"object": "list", "data": resources().proxy.visible_models(caller())})


async def retrieve_model(model: str) -> Response:
    for item in resources().proxy.visible_models(caller()):
        if item["id"] == model:
            return json_response(item)
    raise ModelNotFound(model)
