"""The Responses API: POST /v1/responses, the stored-response calls, and input token counting."""

from __future__ import annotations

from connexion import request
from starlette.responses import Response

from llm_backend.api.common import body_and_raw, caller, resources, to_response


async def create_response() -> Response:
    body, raw = body_and_raw()
    res = resources()
    result = await res.responses.create(body, caller(), raw=raw, admit=res.admit)
    return to_response(result)


async def count_input_tokens() -> Response:
    body, raw = body_and_raw()
    res = resources()
    result = await res.responses.count_input_tokens(body, caller(), raw=raw, admit=res.admit)
    return to_response(result)


async def retrieve_response(response_id: str) -> Response:
    res = resources()
    query = dict(request.query_params)
    return to_response(await res.responses.retrieve(response_id, caller(), query, admit=res.admit))


async def delete_response(response_id: str) -> Response:
    res = resources()
    return to_response(await res.responses.delete(response_id, caller(), admit=res.admit))


async def cancel_response(response_id: str) -> Response:
    res = resources()
    return to_response(await res.responses.cancel(response_id, caller(), admit=res.admit))


async def list_input_items(response_id: str) -> Response:
    res = resources()
    query = dict(request.query_params)
    return to_response(await res.responses.input_items(response_id, caller(), query, admit=res.admit))
