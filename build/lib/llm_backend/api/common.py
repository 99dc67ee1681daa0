"""Shared pieces of the HTTP handlers: per-request context, JSON and SSE responses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from connexion import request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_backend.api.validation import BODY_STATE_KEY
from llm_backend.errors import InvalidRequest
from llm_backend.services.proxy import Caller, JsonResult, StreamResult

if TYPE_CHECKING:
    from llm_backend.lifespan import Resources

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def state() -> dict[str, Any]:
    return request.scope["state"]  # type: ignore[no-any-return]


def resources() -> Resources:
    return state()["resources"]  # type: ignore[no-any-return]


def caller() -> Caller:
    return state()["caller"]  # type: ignore[no-any-return]


def body_and_raw() -> tuple[dict[str, Any], bytes]:
    """The request body the validator already parsed, and its raw bytes ({} and b"" when there was none)."""
    return state().get(BODY_STATE_KEY) or ({}, b"")  # type: ignore[no-any-return]


def body() -> dict[str, Any]:
    return body_and_raw()[0]


def parse_time(value: str, name: str) -> datetime:
    """An ISO 8601 time from a query or a body as an aware UTC datetime (no zone: UTC); InvalidRequest
    naming `name` when it is not one, or lies outside years 1 to 9999 once in UTC (what we can store)."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"Invalid value for '{name}': expected an ISO 8601 time such as 2026-01-31T12:00:00Z "
            "(in UTC between the years 1 and 9999).",
            param=name,
            code="invalid_value",
        ) from None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator, so a vanished client cancels the upstream."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            closer = getattr(self.body_iterator, "aclose", None)
            if closer is not None:
                with anyio.CancelScope(shield=True):
                    await closer()


def to_response(result: JsonResult | StreamResult) -> Response:
    if isinstance(result, StreamResult):
        return EventStreamResponse(
            result.frames, media_type="text/event-stream", headers={**SSE_HEADERS, **result.headers}
        )
    return Response(
        result.content, status_code=result.status_code, headers=result.headers, media_type="application/json"
    )
