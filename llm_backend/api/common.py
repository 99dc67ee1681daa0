"""Shared pieces of the HTTP handlers: per-request context, JSON and SSE responses."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from connexion import request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_backend.api.middleware import DEFERRED_BODY_KEY
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
    """A StreamingResponse that always closes its iterator, so a vanished client cancels the upstream.

    Under RequestContextMiddleware it sends only its head through the middleware chain and leaves the
    body to that middleware (DEFERRED_BODY_KEY): a stream can last minutes, and the chain below (routing,
    security, validation, the operation and their per-request objects) would otherwise stay alive, frame
    by frame, for each held stream."""

    _head_sent = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deferred = scope.get("state", {}).get(DEFERRED_BODY_KEY)
        if deferred is not None and not deferred and scope["type"] == "http":
            try:
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
            except BaseException:
                await self.discard()
                raise
            self._head_sent = True
            self.raw_headers = []  # sent
            deferred.append(self)
            return
        await self.send_body(scope, receive, send)

    async def send_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the body (after the head, unless that went out already); a disconnect cancels it."""
        try:
            if scope["type"] != "http" or _spec_version(scope) >= (2, 4):
                await super().__call__(scope, receive, send)  # the server reports a disconnect on send
                return
            # Starlette's way, without its task group: the body is sent from this task, one small task waits
            # for the disconnect and cancels the sending (a held stream keeps fewer objects alive).
            with anyio.CancelScope() as sending:
                watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, sending))
                try:
                    await self.stream_response(send)
                finally:
                    watcher.cancel()
        finally:
            await self.discard()

    async def discard(self) -> None:
        """Close the iterator, so the relay's cleanup runs (idempotent)."""
        closer = getattr(self.body_iterator, "aclose", None)
        if closer is not None:
            with anyio.CancelScope(shield=True):
                await closer()

    async def stream_response(self, send: Send) -> None:
        if not self._head_sent:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
        async for chunk in self.body_iterator:
            if not isinstance(chunk, bytes | memoryview):
                chunk = chunk.encode(self.charset)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _spec_version(scope: Scope) -> tuple[int, ...]:
    return tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def to_response(result: JsonResult | StreamResult) -> Response:
    if isinstance(result, StreamResult):
        return EventStreamResponse(
            result.frames, media_type="text/event-stream", headers={**SSE_HEADERS, **result.headers}
        )
    return Response(
        result.content, status_code=result.status_code, headers=result.headers, media_type="application/json"
    )
