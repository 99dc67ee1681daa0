"""The connection layer: a gunicorn worker whose uvicorn protocol bounds slow, oversized and excess connections."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from llm_backend.errors import error_body
from llm_backend.logthrottle import LogThrottle

logger = logging.getLogger(__name__)
_throttle = LogThrottle(logger, interval=60.0)

#: File descriptors kept free for everything that is not a client connection (database, Redis, logs).
FD_RESERVE = 256


class ServerConfigError(ValueError):
    """A connection setting in the environment is not usable."""


@dataclass(frozen=True)
class ServerLimits:
    """How long a request may take to arrive, how big its head may be, how many connections a worker holds.

    header_timeout: seconds from the connection (or the first byte of a keep-alive request) to the end of
    the headers. body_timeout: seconds from the end of the headers to the end of the body. max_header_bytes:
    request line plus headers. max_connections: open client connections per worker."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 16_384

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerLimits:
        env = os.environ if env is None else env
        return cls(
            header_timeout=_env_number(env, "HEADER_TIMEOUT", cls.header_timeout),
            body_timeout=_env_number(env, "BODY_TIMEOUT", cls.body_timeout),
            max_header_bytes=int(_env_number(env, "MAX_HEADER_BYTES", cls.max_header_bytes, whole=True)),
            max_connections=int(_env_number(env, "MAX_CONNECTIONS", cls.max_connections, whole=True)),
        )

    def fitted_to_fd_limit(self, fd_limit: int) -> ServerLimits:
        """A client connection can need a second descriptor (its upstream): keep both within the fd limit."""
        room = max(16, (fd_limit - FD_RESERVE) // 2)
        if self.max_connections <= room:
            return self
        logger.warning(
            "MAX_CONNECTIONS=%d does not fit the worker's file descriptor limit (%d): using %d; raise "
            "`ulimit -n` to allow more",
            self.max_connections,
            fd_limit,
            room,
        )
        return ServerLimits(self.header_timeout, self.body_timeout, self.max_header_bytes, room)


def _env_number(env: Mapping[str, str], name: str, default: float, *, whole: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number of seconds"
        raise ServerConfigError(f"environment: {name}={raw!r} is not {kind}") from None
    if value <= 0:
        raise ServerConfigError(f"environment: {name}={raw!r} must be greater than 0")
    return value


def raise_fd_limit() -> int:
    """Lift the soft file descriptor limit to the hard one (the default soft 1,024 is far too few for a
    server that holds thousands of streams); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - a sandbox that forbids it
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def _response(status: bytes, message: str, code: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer with an OpenAI-shaped error body, for refusals made below the app."""
    error_type = "server_error" if status.startswith(b"5") else "invalid_request_error"
    body = orjson.dumps(error_body(message, error_type, None, code))
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
    return head % (status, len(body)) + extra + b"\r\n" + body


# phases of a connection
_IDLE = 0  # no byte of the next request yet (a new connection, or keep-alive between requests)
_HEAD = 1  # the request line / headers are arriving
_BODY = 2  # headers complete, the body is arriving
_APP = 3  # the whole request is in; the app is answering

#: How long a refused connection is kept half-closed so the client reads the answer before the reset.
LINGER = 2.0


class _Registry:
    """The connections of one server that are waiting for a request head or a body, oldest first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.heads: dict[GuardedHttpToolsProtocol, float] = {}  # deadline of the head, insertion = age
        self.idle: dict[GuardedHttpToolsProtocol, None] = {}  # keep-alive between requests
        self.bodies: dict[GuardedHttpToolsProtocol, float] = {}  # deadline of the body
        self._timer: asyncio.TimerHandle | None = None

    def ensure_sweeping(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        for table, status in ((self.heads, "headers"), (self.bodies, "body")):
            expired = []
            for conn, deadline in table.items():  # insertion order is deadline order
                if deadline > now:
                    break
                expired.append(conn)
            for conn in expired:
                conn.timed_out(status)
        if self.heads or self.bodies:
            self.ensure_sweeping()

    def evict_one(self) -> bool:
        """Close the connection that has waited longest for a request head (else the oldest idle one)."""
        for table in (self.heads, self.idle):
            for conn in table:
                conn.evict()
                return True
        return False


_registries: weakref.WeakKeyDictionary[Any, _Registry] = weakref.WeakKeyDictionary()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: a deadline for the request head and for the body, a cap on the
    head's size (431), and a cap on the worker's open connections. At the cap the connection that has
    waited longest for a request head is closed to make room (a slow client loses its place, a working
    one does not); only when every connection is busy with a request is the newcomer refused (503)."""

    # uvicorn's protocol already fills the instance dict's shared keys: ours in slots keep it from growing
    # into a dict of its own per connection
    __slots__ = ("_closing", "_got_bytes", "_head_bytes", "_phase", "_registry")

    limits: ClassVar[ServerLimits] = ServerLimits()
    configured: ClassVar[bool] = False

    @classmethod
    def configure(cls, env: Mapping[str, str] | None = None) -> None:
        """Read the limits from the environment (once per process), after raising the fd limit."""
        cls.limits = ServerLimits.from_env(env).fitted_to_fd_limit(raise_fd_limit())
        cls.configured = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if (
            not self.configured
        ):  # served by plain uvicorn (--http llm_backend.server:GuardedHttpToolsProtocol)
            self.configure()
        super().__init__(*args, **kwargs)
        registry = _registries.get(self.server_state)
        if registry is None:
            tick = min(1.0, self.limits.header_timeout / 4, self.limits.body_timeout / 4)
            registry = _registries[self.server_state] = _Registry(self.loop, max(tick, 0.05))
        self._registry = registry
        self._phase = _IDLE
        self._head_bytes = 0
        self._got_bytes = False
        self._closing = False

    # -- the connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        registry = self._registry
        if len(self.connections) >= self.limits.max_connections and not registry.evict_one():
            self.transport = transport
            _throttle.log(
                "refused",
                logging.WARNING,
                "refused a connection: %d connections open, all busy (MAX_CONNECTIONS)",
                len(self.connections),
            )
            self._refuse(
                b"503 Service Unavailable",
                "The server is at its connection limit; retry shortly.",
                "overloaded",
                b"retry-after: 1\r\n",
            )
            return
        super().connection_made(transport)
        registry.heads[self] = time.monotonic() + self.limits.header_timeout
        registry.ensure_sweeping()

    def connection_lost(self, exc: Exception | None) -> None:
        self._untrack()
        if self.flow is None:  # refused before it was set up
            self.connections.discard(self)
            self.parser = None  # type: ignore[assignment]
            return
        super().connection_lost(exc)

    def _untrack(self) -> None:
        registry = self._registry
        registry.heads.pop(self, None)
        registry.idle.pop(self, None)
        registry.bodies.pop(self, None)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # a refused connection: its remaining bytes are read and dropped
        self._got_bytes = True
        if self._phase <= _HEAD:
            self._head_bytes += len(data)
            super().data_received(data)
            if self._phase <= _HEAD and self._head_bytes > self.limits.max_header_bytes and not self._closing:
                self._too_large()
            return
        super().data_received(data)

    # -- parser callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        registry = self._registry
        if self not in registry.heads:  # keep-alive (or pipelined): the head's deadline starts now
            registry.idle.pop(self, None)
            registry.heads[self] = time.monotonic() + self.limits.header_timeout
            registry.ensure_sweeping()
        self._phase = _HEAD

    def on_headers_complete(self) -> None:
        if self._closing:
            return
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._too_large()
            return
        registry = self._registry
        registry.heads.pop(self, None)
        self._head_bytes = 0
        self._phase = _BODY
        registry.bodies[self] = time.monotonic() + self.limits.body_timeout
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._closing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self._registry.bodies.pop(self, None)
        self._phase = _APP
        super().on_message_complete()
        if self.cycle.response_complete:  # answered before the body was in (e.g. 401, 413)
            self._to_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase == _APP:
            self._to_idle()

    def _to_idle(self) -> None:
        if not self.transport.is_closing():
            self._phase = _IDLE
            self._got_bytes = False
            self._registry.idle[self] = None

    # -- refusals ------------------------------------------------------------------------------------

    def timed_out(self, what: str) -> None:
        """The head or the body did not arrive in time: 408 if the client sent anything, else just close."""
        self._untrack()
        if self._closing:
            return
        _throttle.log(
            f"timeout-{what}",
            logging.INFO,
            "closed a connection whose request %s did not arrive in time (%s)",
            what,
            "HEADER_TIMEOUT" if what == "headers" else "BODY_TIMEOUT",
        )
        if not self._got_bytes and self._phase == _IDLE:
            self._closing = True
            self.transport.close()
            return
        self._refuse(b"408 Request Timeout", f"The request {what} did not arrive in time.", "request_timeout")

    def evict(self) -> None:
        """Make room at the connection limit."""
        self._untrack()
        self.connections.discard(self)
        _throttle.log(
            "evicted",
            logging.WARNING,
            "at the connection limit (MAX_CONNECTIONS=%d): closed the connection that waited longest for a request",
            self.limits.max_connections,
        )
        if self._got_bytes:
            self._refuse(b"408 Request Timeout", "The request did not arrive in time.", "request_timeout")
        else:
            self._closing = True
            self.transport.close()

    def _too_large(self) -> None:
        self._untrack()
        if len(self.url) * 2 > self._head_bytes:  # most of what came is the URL: the request line is too long
            _throttle.log(
                "url-too-long",
                logging.INFO,
                "refused a request whose URL exceeds MAX_HEADER_BYTES=%d",
                self.limits.max_header_bytes,
            )
            self._refuse(
                b"414 URI Too Long",
                f"The URL is longer than the limit of {self.limits.max_header_bytes} bytes.",
                "uri_too_long",
            )
            return
        _throttle.log(
            "header-too-large",
            logging.INFO,
            "refused a request whose headers exceed MAX_HEADER_BYTES=%d",
            self.limits.max_header_bytes,
        )
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"The request line and headers are larger than the limit of {self.limits.max_header_bytes} bytes.",
            "request_header_fields_too_large",
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes httptools cannot parse (a malformed request line or header, a URL past
        the parser's limit), in OpenAI's shape instead of plain text."""
        self._untrack()
        self._refuse(
            b"400 Bad Request",
            f"{msg} The request line or a header is malformed, or the URL is longer than the server accepts.",
            "invalid_request",
        )

    def _refuse(self, status: bytes, message: str, code: str, extra: bytes = b"") -> None:
        """Answer and close: half-close after the answer and drop what the client still sends for a moment,
        so it reads the answer instead of a connection reset."""
        self._closing = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True  # the app, if waiting for the body, sees a disconnect
            cycle.message_event.set()
        transport = self.transport
        transport.write(_response(status, message, code, extra))
        try:
            transport.resume_reading()
            if transport.can_write_eof():
                transport.write_eof()
        except (RuntimeError, OSError):  # pragma: no cover - closing already
            transport.close()
            return
        self.loop.call_later(LINGER, transport.abort)


class Worker(UvicornWorker):
    """gunicorn's uvicorn worker (uvloop + httptools) with the guarded protocol and a raised fd limit."""

    # no WebSocket routes exist: an Upgrade header is an ordinary request, never a hand-over of the socket
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "http": GuardedHttpToolsProtocol, "ws": "none"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        GuardedHttpToolsProtocol.configure()
