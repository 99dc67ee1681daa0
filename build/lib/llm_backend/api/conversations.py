"""The sessions API under /api/conversations: the server keeps the history, the client only the id."""

from __future__ import annotations

from datetime import datetime

from starlette.responses import Response

from llm_backend.api.common import body, caller, json_response, parse_time, resources, to_response
from llm_backend.services.conversations import ConversationService


def _service() -> ConversationService:
    return resources().conversations  # type: ignore[no-any-return]


def _time(value: str | None, name: str) -> datetime | None:
    return parse_time(value, name) if value else None


async def list_conversations(
    owner: str | None = None,
    model: str | None = None,
    q: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> Response:
    params = {
        "owner": owner,
        "model": model,
        "q": q,
        "created_after": _time(created_after, "created_after"),
        "created_before": _time(created_before, "created_before"),
        "limit": limit,
        "cursor": cursor,
    }
    return json_response(await _service().list_conversations(caller(), params))


async def create_conversation() -> Response:
    return json_response(await _service().create(caller(), body()), 201)


async def get_conversation(conversation_id: str) -> Response:
    return json_response(await _service().get(caller(), conversation_id))


async def update_conversation(conversation_id: str) -> Response:
    return json_response(await _service().rename(caller(), conversation_id, body()["title"]))


async def delete_conversation(conversation_id: str) -> Response:
    return json_response(await _service().delete(caller(), conversation_id))


async def post_message(conversation_id: str) -> Response:
    result, turn = await _service().post_message(caller(), conversation_id, body(), resources().admit)
    if turn is None:
        return to_response(result)
    return json_response(turn, headers=result.headers)  # type: ignore[union-attr]


async def generate_title(conversation_id: str) -> Response:
    return json_response(await _service().make_title(caller(), conversation_id, body(), resources().admit))


async def export_conversation(conversation_id: str, format: str = "json") -> Response:
    media_type, content = await _service().export(caller(), conversation_id, format)
    ext = "md" if format == "markdown" else "json"
    headers = {"Content-Disposition": f'attachment; filename="conversation-{conversation_id}.{ext}"'}
    return Response(content, media_type=media_type, headers=headers)
