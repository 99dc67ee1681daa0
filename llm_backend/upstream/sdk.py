"""Backends reached through the openai SDK: Azure OpenAI deployments and OpenAI-compatible servers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import httpx2
import openai
import orjson

from llm_backend.config import BackendConfig
from llm_backend.upstream.base import (
    DEPLOYMENT_SCOPED,
    DONE,
    Backend,
    SseSplitter,
    UpstreamResponse,
    UpstreamStream,
    request_headers,
)
from llm_backend.upstream.errors import (
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamClientError,
    UpstreamContentFilter,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_SSE_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
#: Idle connections kept for reuse (httpx's pool; aiohttp keeps every idle one up to max_connections).
MAX_KEEPALIVE = 200

TokenProvider = Callable[[], Any]


def make_http_client(kind: str, config: BackendConfig) -> httpx2.AsyncClient:
    """The HTTP client under the SDK: aiohttp's transport by default (it does not scan its pool per request)."""
    t = config.timeout
    timeout = httpx2.Timeout(t.total, connect=t.connect, read=t.first_byte)
    # One client serves every request of this worker to this backend, and each stream holds a connection
    # for its whole length: the pool must be as large as the streams a worker holds (`max_connections`),
    # or new streams queue for a connection behind the running ones.
    limits = httpx2.Limits(
        max_connections=config.max_connections,
        max_keepalive_connections=min(MAX_KEEPALIVE, config.max_connections),
        keepalive_expiry=60,
    )
    if kind == "aiohttp":
        return openai.DefaultAioHttpClient(timeout=timeout, limits=limits)
    return openai.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)


class SdkBackend(Backend):
    """An Azure OpenAI deployment (AsyncAzureOpenAI) or an OpenAI-compatible server (AsyncOpenAI)."""

    def __init__(
        self,
        config: BackendConfig,
        *,
        http_client_kind: str = "aiohttp",
        azure_ad_token_provider: TokenProvider | None = None,
    ) -> None:
        super().__init__(config)
        self._http = make_http_client(http_client_kind, config)
        common: dict[str, Any] = {
            "max_retries": 0,  # routing owns retries and failover
            "http_client": self._http,
            "default_headers": dict(config.headers) or None,
        }
        # where each operation goes: scoped operations under `_scoped`, the others (Responses) under "/"
        self._scoped = "/"
        self._body_model: str | None = None  # the body's `model` for every operation
        self._unscoped_model: str | None = None  # … for operations outside /deployments/{d}/
        if config.provider == "azure" and config.azure_v1:
            # Azure's v1 API: the plain OpenAI client on {endpoint}/openai/v1, the deployment as `model`
            key: Any = config.api_key
            if config.auth == "entra_id":
                if azure_ad_token_provider is None:
                    raise ValueError(f"backend {config.name}: entra_id auth needs a token provider")
                key = azure_ad_token_provider
            self.client: openai.AsyncOpenAI = openai.AsyncOpenAI(
                base_url=f"{(config.endpoint or '').rstrip('/')}/openai/v1", api_key=key, **common
            )
            self._body_model = config.deployment
        elif config.provider == "azure":
            azure_kw: dict[str, Any] = {}
            if config.auth == "entra_id":
                if azure_ad_token_provider is None:
                    raise ValueError(f"backend {config.name}: entra_id auth needs a token provider")
                azure_kw["azure_ad_token_provider"] = azure_ad_token_provider
            else:
                azure_kw["api_key"] = config.api_key
            self.client = openai.AsyncAzureOpenAI(
                azure_endpoint=config.endpoint or "",
                api_version=config.api_version,
                **azure_kw,
                **common,
            )
            self._scoped = f"/deployments/{config.deployment}/"
            self._unscoped_model = config.deployment
        else:
            self.client = openai.AsyncOpenAI(
                base_url=config.base_url,
                api_key=config.api_key or "not-needed",
                organization=config.organization,
                **common,
            )
            self._body_model = config.model
        self._total_timeout = config.timeout.total

    def rewrites_model(self) -> bool:
        return self._body_model is not None

    def body_model(self, operation: str) -> str | None:
        if self._body_model is not None:
            return self._body_model
        return None if operation in DEPLOYMENT_SCOPED else self._unscoped_model

    def _path(self, operation: str) -> str:
        return (self._scoped if operation in DEPLOYMENT_SCOPED else "/") + operation

    async def post(self, operation: str, body: bytes, *, model: str) -> UpstreamResponse:
        return await self._call("post", self._path(operation), body, None)

    async def send(
        self, method: str, path: str, body: bytes | None = None, *, query: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        return await self._call(method.lower(), "/" + path, body, query)

    async def _call(
        self, method: str, path: str, body: bytes | None, query: Mapping[str, str] | None
    ) -> UpstreamResponse:
        extra = request_headers.get()
        options: dict[str, Any] = {"headers": _JSON_HEADERS if extra is None else {**_JSON_HEADERS, **extra}}
        if query:
            options["params"] = dict(query)

        async def call() -> UpstreamResponse:
            async with asyncio.timeout(self._total_timeout):
                response: httpx2.Response = await getattr(self.client, method)(
                    path, cast_to=httpx2.Response, options=options, **({"content": body} if body else {})
                )
                content = await response.aread()
            return UpstreamResponse(response.status_code, content, response.headers)

        try:
            return await self._translated(call())
        except TimeoutError:
            raise UpstreamTimeout(
                f"the upstream did not answer within {self._total_timeout:g}s", backend=self.name
            ) from None

    async def open_stream(
        self, operation: str, body: bytes, *, model: str, events: bool = False
    ) -> UpstreamStream:
        extra = request_headers.get()
        response: httpx2.Response = await self._translated(
            self.client.post(
                self._path(operation),
                cast_to=httpx2.Response,
                content=body,
                options={"headers": _SSE_HEADERS if extra is None else {**_SSE_HEADERS, **extra}},
                stream=True,
            )
        )
        return _SdkStream(self, response, events=events)

    async def _translated(self, call: Awaitable[_T]) -> _T:
        """Await an SDK call, turning its failures into the domain's UpstreamErrors."""
        try:
            return await call
        except UpstreamError as exc:  # from the token provider
            exc.backend = self.name
            raise
        except openai.APIError as exc:
            raise self._translate(exc) from None
        except httpx2.HTTPError as exc:
            raise self._transport_error(exc) from None

    async def close(self) -> None:
        await self.client.close()

    # -- error translation -------------------------------------------------------------------------------

    def _transport_error(self, exc: BaseException) -> UpstreamError:
        chain: list[BaseException] = []
        e: BaseException | None = exc
        while e is not None and len(chain) < 8:
            chain.append(e)
            e = e.__cause__ or e.__context__
        names = " ".join(type(c).__name__ for c in chain)
        refused = any(
            isinstance(c, ConnectionError | OSError) and not isinstance(c, TimeoutError) for c in chain
        )
        if "Connector" in names or ("Connect" in names and "Timeout" not in names) or refused:
            return UpstreamUnreachable(
                f"could not connect to the upstream {self._where()}", backend=self.name
            )
        if "Timeout" in names or any(isinstance(c, TimeoutError) for c in chain):
            return UpstreamTimeout(f"the upstream {self._where()} timed out", backend=self.name)
        return UpstreamUnreachable(
            f"the connection to the upstream {self._where()} failed ({type(exc).__name__})", backend=self.name
        )

    def _where(self) -> str:
        return f"backend {self.name!r}"

    def _translate(self, exc: openai.APIError) -> UpstreamError:
        if isinstance(exc, openai.APIStatusError):
            return translate_status(exc.status_code, exc.response.headers, exc.response.content, self.name)
        if isinstance(exc, openai.APITimeoutError):
            # aiohttp maps refused connections to a connect timeout: look at the cause chain
            err = self._transport_error(exc)
            return (
                err
                if isinstance(err, UpstreamUnreachable)
                else UpstreamTimeout(f"the upstream {self._where()} timed out", backend=self.name)
            )
        return self._transport_error(exc)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            from datetime import UTC, datetime
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
            except (TypeError, ValueError):
                return None
    return None


def translate_status(status: int, headers: Mapping[str, str], content: bytes, backend: str) -> UpstreamError:
    """Turn an upstream non-2xx answer into the domain error (never leaking the server's credentials)."""
    try:
        body = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        body = None
    err = body.get("error") if body else None
    message = err.get("message") if isinstance(err, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    if status == 429:
        return UpstreamRateLimited(
            message or "the upstream is rate limiting requests",
            retry_after=_retry_after(headers),
            body=body,
            backend=backend,
            upstream_status=status,
        )
    if status in (401, 403):
        return UpstreamAuthFailed(
            "the upstream refused this server's credentials (check the backend's api_key or identity); "
            "this is a server configuration problem, not the client's",
            backend=backend,
            upstream_status=status,
        )
    if 400 <= status < 500:
        inner = err.get("innererror") if isinstance(err, dict) else None
        inner_code = inner.get("code") if isinstance(inner, dict) else None
        if code == "content_filter" or inner_code == "ResponsibleAIPolicyViolation":
            return UpstreamContentFilter(
                message or "the prompt was filtered by the content policy",
                status_code=400,
                body=body,
                backend=backend,
                upstream_status=status,
            )
        return UpstreamClientError(
            message or f"the upstream rejected the request ({status})",
            status_code=status,
            body=body,
            backend=backend,
            upstream_status=status,
        )
    detail = f": {message}" if message else ""
    return UpstreamServerError(
        f"the upstream backend {backend!r} failed with status {status}{detail}",
        backend=backend,
        upstream_status=status,
    )


def _shed_request(response: httpx2.Response) -> None:
    """Once a stream's head is in, forget the request that opened it: its body, the SDK's headers and the
    transport's copy of them would otherwise stay alive for the whole stream (every held stream pays them).
    Nothing reads them again: errors while reading the body name the backend, not the request."""
    response._request = None
    aio: Any = getattr(getattr(response.stream, "_stream", None), "_aiohttp_response", None)
    info = getattr(aio, "_request_info", None)
    if info is not None and _NO_HEADERS is not None and len(info.headers):
        try:
            aio._request_info = type(info)(info.url, info.method, _NO_HEADERS, info.real_url)
        except (TypeError, AttributeError):  # pragma: no cover - another aiohttp's RequestInfo
            pass


try:  # the request headers kept by aiohttp's response, once shed
    from multidict import CIMultiDict, CIMultiDictProxy

    _NO_HEADERS: Any = CIMultiDictProxy(CIMultiDict())
except ImportError:  # pragma: no cover - aiohttp (and multidict) not installed
    _NO_HEADERS = None


class _TotalTimeout(Exception):
    """Set on a stream's reader when the backend's total timeout has passed."""


def _raw_content(response: httpx2.Response) -> Any:
    """aiohttp's reader of the body under the SDK's response, when the body can be read from it as sent
    (no content encoding, which httpx would decode); else None."""
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    aio: Any = getattr(getattr(response.stream, "_stream", None), "_aiohttp_response", None)
    content = getattr(aio, "content", None)
    return content if callable(getattr(content, "readany", None)) else None


class _SdkStream(UpstreamStream):
    """An upstream's SSE stream, read straight from aiohttp's body reader under the SDK's response: each
    wait for the next chunk is one await on the socket, with one timer for the whole stream, instead of a
    chain of eight async generators and a timer per chunk (objects every held stream would rebuild for
    each chunk, and that the garbage collector would walk). Other transports go through httpx."""

    def __init__(self, backend: SdkBackend, response: httpx2.Response, *, events: bool = False) -> None:
        self._backend = backend
        self._response = response
        self._content = _raw_content(response)
        _shed_request(response)
        self._events = events
        self.headers = response.headers
        # the whole stream, from the request on, must end within the backend's total timeout
        self._deadline = asyncio.get_running_loop().time() + backend.config.timeout.total

    async def __aiter__(self) -> AsyncIterator[Any]:  # type: ignore[override]
        events, splitter, content = self._events, SseSplitter(), self._content
        loop = asyncio.get_running_loop()
        expiry = None if content is None else loop.call_at(self._deadline, self._expire, content)
        chunks = self._response.aiter_bytes().__aiter__() if content is None else None
        try:
            while True:
                if content is not None:
                    chunk = await content.readany()  # b"" once the body has ended
                else:
                    assert chunks is not None
                    try:
                        async with asyncio.timeout_at(self._deadline):
                            chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        chunk = b""
                    except TimeoutError:
                        raise _TotalTimeout() from None
                parsed = splitter.feed(chunk) if chunk else splitter.close()
                for block, data in parsed:
                    if events:
                        yield block, data
                    elif data == DONE:
                        await self._read_to_end(content, chunks)
                        return
                    else:
                        yield data
                if not chunk:
                    break
            if not events:
                raise UpstreamBadResponse(
                    f"the upstream stream from {self._backend.name!r} ended before it was complete",
                    backend=self._backend.name,
                )
        except _TotalTimeout:
            raise UpstreamTimeout(
                f"the upstream stream from {self._backend.name!r} ran past its total timeout of "
                f"{self._backend.config.timeout.total:g}s",
                backend=self._backend.name,
            ) from None
        except (httpx2.TimeoutException, TimeoutError):  # (aiohttp's read timeout is a TimeoutError)
            raise UpstreamTimeout(
                f"the upstream backend {self._backend.name!r} stopped sending", backend=self._backend.name
            ) from None
        except (httpx2.HTTPError, openai.APIError, aiohttp.ClientError) as exc:
            raise UpstreamBadResponse(
                f"the upstream stream from {self._backend.name!r} broke off ({type(exc).__name__})",
                backend=self._backend.name,
            ) from None
        finally:
            if expiry is not None:
                expiry.cancel()
            await self.aclose()

    @staticmethod
    def _expire(content: Any) -> None:
        content.set_exception(_TotalTimeout())

    @staticmethod
    async def _read_to_end(content: Any, chunks: AsyncIterator[bytes] | None) -> None:
        """Read the body to its end (after [DONE]), so the connection goes back to the pool, not closed."""
        if content is not None:
            while await content.readany():
                pass
        elif chunks is not None:
            async for _ in chunks:
                pass

    async def aclose(self) -> None:
        if not self._response.is_closed:
            await self._response.aclose()
