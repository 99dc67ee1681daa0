"""POST /v1/completions (the legacy text completions API)."""

from __future__ import annotations

from starlette.responses import Response

from llm_backend.api.common import body_and_raw, caller, resources, to_response
from llm_backend.upstream.base import COMPLETIONS


async def create_completion() -> Response:
    body, raw = body_and_raw()
    res = resources()
    result = await res.proxy.forward(COMPLETIONS, body, caller(), raw=raw, admit=res.admit)
    return to_response(result)
