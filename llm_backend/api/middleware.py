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

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


class RequestContextMiddleware:
    """Gives every request an id and a Caller, enforces the body limit and logs one line when it ends."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, trusted_proxies: Sequence[Network] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.trusted = tuple(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http" or scope["method"] == "OPTIONS"
        ):  # CORS preflights are not requests to record
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id")
        request_id = incoming.decode("latin-1") if incoming else ""
        if not _REQUEST_ID.match(request_id):
            request_id = f"req_{uuid.uuid4().hex}"
        conversation = headers.get(b"x-conversation-id")
        caller = Caller(
            request_id=request_id,
            route=scope["path"],
            client_ip=client_ip(scope, headers, self.trusted),
            conversation_id=conversation.decode("latin-1")[:64] if conversation else None,
        )
        state = scope.setdefault("state", {})
        state["caller"] = caller
        status = 500
        rid_header = (b"x-request-id", request_id.encode())

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send, rid_header)
            self._log(scope, caller, 413)
            return

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        if length is None and b"transfer-encoding" in headers:
            # A chunked body: read it here (bounded), then hand it on with a Content-Length, which the
            # request validation needs to see that there is a body at all.
            try:
                body, receive = await self._buffer(receive)
            except PayloadTooLarge:
                await self._too_large(send, rid_header)
                self._log(scope, caller, 413)
                return
            scope = dict(scope)
            scope["headers"] = [
                *((k, v) for k, v in scope["headers"] if k not in (b"transfer-encoding", b"content-length")),
                (b"content-length", str(len(body)).encode()),
            ]
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
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

    async def _too_large(self, send: Send, rid_header: tuple[bytes, bytes]) -> None:
        body = orjson.dumps(
            error_body(
                f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
                "invalid_request_error",
                None,
                "request_too_large",
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    rid_header,
                ],
            }
        )
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
        fields.update(caller.log)
        logger.info("%s %s %s %.1fms", scope["method"], scope["path"], status, latency, extra=fields)
