"""POST /v1/embeddings."""

from __future__ import annotations

from starlette.responses import Response

from llm_backend.api.common import body_and_raw, caller, resources, to_response
from llm_backend.upstream.base import EMBEDDINGS


async def create_embedding() -> Response:
    body, raw = body_and_raw()
    res = resources()
    result = await res.proxy.forward(EMBEDDINGS, body, caller(), raw=raw, admit=res.admit)
    return to_response(result)
