"""The outermost ASGI middleware: request id, client IP, body size limit, the access log line."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_backend.errors import PayloadTooLarge, error_body
from llm_backend.services.proxy import Caller

logger = logging.getLogger("llm_backend.access")

# The headers a client names its own id for a request in, in order of preference: OpenAI's, the Azure
# SDKs', and the de-facto X-Request-Id of proxies and older clients.
_CLIENT_ID_HEADERS = (b"x-client-request-id", b"x-ms-client-request-id", b"x-request-id")
CLIENT_REQUEST_ID_MAX = 512  # OpenAI's limit for X-Client-Request-Id
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Header values that name no chat: a UI's template placeholder before the chat has an id
_NO_CHAT_ID = frozenset({"new", "null", "undefined", "none"})
#: scope["state"] key of a list where a streaming response that has sent its head leaves itself, for this
#: middleware to send its body once the chain below has returned (see EventStreamResponse): the object
#: has `send_body(scope, receive, send)` and `discard()`.
DEFERRED_BODY_KEY = "llmb.deferred_body"


def client_ip(scope: Scope, headers: dict[bytes, bytes], trusted: Sequence[Network]) -> str | None:
    """The caller's address; X-Forwarded-For is honoured only when the peer is a trusted proxy."""
    peer = scope.get("client")
    ip = peer[0] if peer else None
    if not trusted or ip is None:
        return ip
    forwarded = headers.get(b"x-forwarded-for")
    if not forwarded:
        return ip
    chain = [p.strip() for p in forwarded.decode("latin-1").split(",") if p.strip()] + [ip]
    # walk from the nearest hop back while the hop is one of our proxies
    for hop in reversed(chain):
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            return hop
        if not any(addr in net for net in trusted):
            return hop
    return chain[0]


def client_request_id(headers: dict[bytes, bytes]) -> tuple[str | None, bytes | None]:
    """The id the client gave the request, and the header it came in: printable ASCII only (anything else
    is dropped, so it is safe to log, store and echo), at most CLIENT_REQUEST_ID_MAX characters."""
    for name in _CLIENT_ID_HEADERS:
        raw = headers.get(name)
        if raw:
            value = _NOT_PRINTABLE.sub("", raw.decode("latin-1")).strip()[:CLIENT_REQUEST_ID_MAX].strip()
            if value:
                return value, name
    return None, None


class RequestContextMiddleware:
    """Gives every request an id and a Caller, enforces the body limit and logs one line when it ends."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        trusted_proxies: Sequence[Network] = (),
        conversation_headers: Sequence[str] = ("X-Conversation-Id",),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.trusted = tuple(trusted_proxies)
        # (header, is our own conversation id); any other header carries the client's chat id
        self.conversation_headers = tuple(
            (h.lower().encode("latin-1"), h.lower() == "x-conversation-id") for h in conversation_headers
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http" or scope["method"] == "OPTIONS"
        ):  # CORS preflights are not requests to record
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        # Our id names the request (and its row) always; a client's id is kept beside it, never in its place:
        # a client reusing one id, or sending another's, must not merge or hide requests.
        request_id = f"req_{uuid.uuid4().hex}"
        client_id, client_header = client_request_id(headers)
        caller = Caller(
            request_id=request_id,
            route=scope["path"],
            client_ip=client_ip(scope, headers, self.trusted),
            client_request_id=client_id,
        )
        for name, ours in self.conversation_headers:
            value = headers.get(name, b"").decode("latin-1").strip()
            if value and value.lower() not in _NO_CHAT_ID:
                if ours:
                    caller.conversation_id = value[:64]
                else:
                    caller.external_conversation_id = value[:255]
                break
        state = scope.setdefault("state", {})
        state["caller"] = caller
        trace_headers = state.get("trace_headers")
        if trace_headers:  # tracing is on: the client's trace context, for the request's span
            caller.trace_context = {
                h.decode("latin-1"): headers[h].decode("latin-1") for h in trace_headers if h in headers
            }
        on_start = state.get("on_request_start")
        if on_start is not None:  # the metrics' count of requests in flight
            on_start(caller)
        status = 500
        id_headers = [(b"x-request-id", request_id.encode())]
        if client_id is not None:
            echoed = client_id.encode()
            id_headers.append((b"x-client-request-id", echoed))
            if client_header == b"x-ms-client-request-id":  # Azure echoes it under its own name
                id_headers.append((client_header, echoed))

        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            # Nothing may carry a NUL into a lookup (PostgreSQL refuses it in text): refused before any
            # handler, like any malformed URL.
            await self._refuse(
                send,
                id_headers,
                400,
                "The URL contains a NUL character (%00), which no path or parameter may contain.",
                "invalid_url",
            )
            self._log(scope, caller, 400)
            return

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send, id_headers)
            self._log(scope, caller, 413)
            return

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *id_headers]
            await send(message)

        if length is None and b"transfer-encoding" in headers:
            # A chunked body: read it here (bounded), then hand it on with a Content-Length, which the
            # request validation needs to see that there is a body at all.
            try:
                body, receive = await self._buffer(receive)
            except PayloadTooLarge:
                await self._too_large(send, id_headers)
                self._log(scope, caller, 413)
                return
            scope = dict(scope)
            scope["headers"] = [
                *((k, v) for k, v in scope["headers"] if k not in (b"transfer-encoding", b"content-length")),
                (b"content-length", str(len(body)).encode()),
            ]
        deferred: list[Any] = []
        state[DEFERRED_BODY_KEY] = deferred
        try:
            await self.app(scope, receive, send_wrapper)
            if deferred:
                await deferred.pop().send_body(scope, receive, send_wrapper)
        finally:
            if deferred:  # the chain below failed after the head went out
                await deferred.pop().discard()
            self._log(scope, caller, status)

    async def _buffer(self, receive: Receive) -> tuple[bytes, Receive]:
        """Read a whole chunked body (PayloadTooLarge past the limit) and a receive that replays it."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"The request body is larger than the limit of {self.max_body_bytes} bytes."
                )
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return body, replay

    async def _too_large(self, send: Send, id_headers: list[tuple[bytes, bytes]]) -> None:
        message = f"The request body is larger than the limit of {self.max_body_bytes} bytes."
        await self._refuse(send, id_headers, 413, message, "request_too_large", close=True)

    async def _refuse(
        self,
        send: Send,
        id_headers: list[tuple[bytes, bytes]],
        status: int,
        message: str,
        code: str,
        *,
        close: bool = False,
    ) -> None:
        body = orjson.dumps(error_body(message, "invalid_request_error", None, code))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": [*headers, *id_headers]})
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope: Scope, caller: Caller, status: int) -> None:
        on_done = scope.get("state", {}).get("on_request_done")
        quiet = False  # the hook sums up refusals of junk in one line per interval instead
        if on_done is not None:
            try:
                quiet = bool(on_done(caller, status, scope["state"]))
            except Exception:
                logger.exception("request-completion hook failed")
        if quiet or not logger.isEnabledFor(logging.INFO):
            return
        latency = (time.perf_counter() - caller.started) * 1000
        fields: dict[str, Any] = {
            "request_id": caller.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round(latency, 2),
            "client_ip": caller.client_ip,
        }
        if caller.key_id:
            fields["key_id"] = caller.key_id
        if caller.client_request_id:
            fields["client_request_id"] = caller.client_request_id
        fields.update(caller.log)
        logger.info("%s %s %s %.1fms", scope["method"], scope["path"], status, latency, extra=fields)
