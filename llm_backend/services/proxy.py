"""Forwarding: pick a backend for the model, send the request, pass answers and streams back, record them."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import orjson

from llm_backend.errors import GatewayError, InvalidRequest, ModelNotFound
from llm_backend.recording.records import (
    OUTCOME_CLIENT_DISCONNECTED,
    OUTCOME_ERROR,
    OUTCOME_INTERRUPTED,
    OUTCOME_OK,
    RequestRecord,
    Usage,
)
from llm_backend.tokens import count_tokens, estimate_prompt_tokens
from llm_backend.upstream.base import CHAT, EMBEDDINGS, Backend, UpstreamStream
from llm_backend.upstream.errors import (
    NoBackendAvailable,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
)
from llm_backend.upstream.router import BackendState, ModelRoute, Router

logger = logging.getLogger(__name__)

OPERATION_NAMES = {CHAT: "chat", "completions": "completions", EMBEDDINGS: "embeddings"}
DONE_FRAME = b"data: [DONE]\n\n"
#: How often a running stream's provisional record is journaled again with the tokens relayed so far.
PROGRESS_INTERVAL = 1.0


class RecordSink(Protocol):
    """Where records go. A sink may also have `started(record)`: a provisional record, journaled when the
    upstream is asked, for the request to be recorded even if the process dies before it ends."""

    def submit(self, record: RequestRecord) -> None: ...


class NullSink:
    """Recording switched off."""

    def submit(self, record: RequestRecord) -> None:
        return None


class Admission(Protocol):
    """What access control hands back for an admitted request; settled once with the real usage."""

    headers: dict[str, str]

    async def settle(self, total_tokens: int) -> None: ...


Admit = Callable[["Caller", ModelRoute, dict[str, Any], str], Any]  # (caller, route, body, operation)
OnReply = Callable[[dict[str, Any] | None, Usage, str], Awaitable[None]]


@dataclass(slots=True)
class Caller:
    """Who is asking and how, as the API layer saw it. `log` collects fields for the access log line."""

    request_id: str
    route: str
    client_ip: str | None = None
    key_id: str | None = None
    allowed_models: frozenset[str] | None = None  # None: every model
    key_name: str | None = None
    is_admin: bool = False
    limits: Any = None  # llm_backend.limits.KeyLimits of the key, when it has any
    conversation_id: str | None = None
    external_conversation_id: str | None = None  # the client's chat id (CONVERSATION_ID_HEADERS), per key
    client_request_id: str | None = None  # the id the client sent for the request (ours is request_id)
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    log: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False
    record_messages: bool = True


@dataclass(frozen=True, slots=True)
class JsonResult:
    content: bytes
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamResult:
    frames: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


def _completion_tokens(data: Any) -> int:
    """Estimated completion tokens of a JSON answer without `usage`: its choices' text and tool calls."""
    if not isinstance(data, dict):
        return 0
    total = 0
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, str):
                total += count_tokens(content)
            elif isinstance(content, list):
                total += sum(
                    count_tokens(p["text"])
                    for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            for call in message.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    total += count_tokens(str(fn.get("name") or "")) + count_tokens(
                        str(fn.get("arguments") or "")
                    )
        elif isinstance(choice.get("text"), str):
            total += count_tokens(choice["text"])
    return total


def usage_from(data: Any, *, estimated: bool = False) -> Usage | None:
    """The upstream's `usage` object as Usage; None when it is missing or not numbers (then we estimate)."""
    if not isinstance(data, dict):
        return None
    try:
        prompt = int(data.get("prompt_tokens") or 0)
        completion = int(data.get("completion_tokens") or 0)
        total = int(data.get("total_tokens") or (prompt + completion))
        pd = data.get("prompt_tokens_details") or {}
        cd = data.get("completion_tokens_details") or {}
        cached = pd.get("cached_tokens") if isinstance(pd, dict) else None
        reasoning = cd.get("reasoning_tokens") if isinstance(cd, dict) else None
        return Usage(
            prompt,
            completion,
            total,
            int(cached) if cached is not None else None,
            int(reasoning) if reasoning is not None else None,
            estimated,
        )
    except (TypeError, ValueError):
        return None


class ProxyService:
    """Forwards OpenAI-style requests to the model's backends and records every one of them."""

    def __init__(
        self,
        router: Router,
        recorder: RecordSink | None = None,
        *,
        record_content: bool = True,
    ) -> None:
        self.router = router
        self.recorder: RecordSink = recorder or NullSink()
        self.record_content = record_content
        # provisional records (journaled when the upstream is asked), if the sink keeps them
        self._started: Callable[[RequestRecord], None] | None = getattr(recorder, "started", None)

    # -- model resolution -------------------------------------------------------------------------------

    def resolve(self, caller: Caller, model: str | None) -> ModelRoute:
        route = self.router.resolve(model)
        if route is None or not self.may_use(caller, route):
            raise ModelNotFound(model)
        return route

    def may_use(self, caller: Caller, route: ModelRoute) -> bool:
        allowed = caller.allowed_models
        if allowed is None:
            return True
        return route.name in allowed or any(a in allowed for a in route.config.aliases)

    def visible_models(self, caller: Caller) -> list[dict[str, Any]]:
        """The model objects of /v1/models, only those the caller may use."""
        out = []
        for m in self.router.models:
            if caller.allowed_models is not None and not (
                m.name in caller.allowed_models or any(a in caller.allowed_models for a in m.aliases)
            ):
                continue
            for name in (m.name, *m.aliases):
                out.append({"id": name, "object": "model", "created": 1700000000, "owned_by": m.owned_by})
        return out

    # -- forwarding -------------------------------------------------------------------------------------

    async def forward(
        self,
        operation: str,
        body: dict[str, Any],
        caller: Caller,
        *,
        raw: bytes | None = None,
        model: str | None = None,
        azure_style: bool = False,
        admit: Admit | None = None,
        record_messages: bool = True,
        on_reply: OnReply | None = None,
    ) -> JsonResult | StreamResult:
        """Forward one request. `model` overrides the body's (the Azure-style routes name a deployment).

        `record_messages=False` keeps the content out of the record (the sessions API stores it itself);
        `on_reply(reply, usage, outcome)` is called when a stream ends, with the assembled reply.
        """
        caller.record_messages = record_messages
        requested = model if model is not None else body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise InvalidRequest("`model` must be a string", param="model")
        caller.log["model"] = requested
        stream = bool(body.get("stream")) and operation != EMBEDDINGS
        caller.log["stream"] = stream
        try:
            route = self.resolve(caller, requested)
            admission = await admit(caller, route, body, operation) if admit is not None else None
        except GatewayError as exc:
            self._record_failure(
                operation, body, caller, requested, stream, exc.status_code, exc.code or exc.error_type
            )
            raise
        try:
            if stream:
                return await self._forward_stream(
                    operation, body, caller, route, requested, azure_style, admission, on_reply
                )
            return await self._forward_json(
                operation, body, raw, caller, route, requested, azure_style, admission
            )
        except BaseException:
            # settling is idempotent: this only matters when something unexpected cut the request short
            with anyio.CancelScope(shield=True):
                await self._settle(admission, 0)
            raise

    def _encode(
        self,
        body: dict[str, Any],
        raw: bytes | None,
        backend: Backend,
        route: ModelRoute,
        requested: str | None,
    ) -> bytes:
        if backend.rewrites_model():
            return orjson.dumps({**body, "model": backend.config.model})
        if backend.provider != "azure" and body.get("model") != requested:
            # Azure-style inbound route (deployment in the path) to an OpenAI-style upstream: name the model
            return orjson.dumps(
                {**body, "model": requested if not route.config.wildcard else body.get("model")}
            )
        if raw is not None:
            return raw
        return orjson.dumps(body)

    async def _attempts(
        self,
        operation: str,
        route: ModelRoute,
        caller: Caller,
        send: Callable[[Backend], Any],
        *,
        hold: bool = False,
    ) -> tuple[Any, BackendState, int]:
        """Try the route's backends in order, failing over on the errors the model allows.

        With `hold`, the winning backend's slot stays taken (a stream releases it when it ends).
        """
        try:
            plan = self.router.plan(route)  # raises NoBackendAvailable when every backend is out
        except NoBackendAvailable as exc:
            exc.attempts = 0  # type: ignore[attr-defined]
            raise
        budget = 1 + route.config.retries
        last: UpstreamError | None = None
        attempts = 0
        for state in plan:
            if attempts >= budget:
                break
            if not self.router.acquire(state):
                continue  # filled up (max_parallel) or a probe is already out
            attempts += 1
            started = time.perf_counter()
            try:
                result = await send(state.backend)
            except UpstreamError as exc:
                self.router.failed(state, exc)
                exc.backend = exc.backend or state.name
                last = exc
                logger.warning(
                    "upstream attempt %d for model %s on backend %s failed: %s",
                    attempts,
                    route.name,
                    state.name,
                    exc.message,
                    extra={"request_id": caller.request_id, "backend": state.name, "attempt": attempts},
                )
                if not exc.retryable or exc.failover_kind not in route.config.fail_over_on:
                    break
                continue
            except BaseException:
                self.router.abandoned(state)
                raise
            self.router.succeeded(state, (time.perf_counter() - started) * 1000, release=not hold)
            caller.log["attempts"] = attempts
            return result, state, attempts
        if last is None:
            busy = NoBackendAvailable(
                f"Every backend of model '{route.name}' is busy or unavailable; try again shortly."
            )
            busy.retry_after = 1.0
            busy.attempts = 0  # type: ignore[attr-defined]
            raise busy
        last.attempts = attempts  # type: ignore[attr-defined]
        if isinstance(last, UpstreamRateLimited):
            # every backend tried is cooling down now: tell the client when the first one is back
            soonest = self.router.earliest_recovery(route)
            if soonest is not None:
                last.retry_after = soonest
        raise last

    async def _forward_json(
        self,
        operation: str,
        body: dict[str, Any],
        raw: bytes | None,
        caller: Caller,
        route: ModelRoute,
        requested: str | None,
        azure_style: bool,
        admission: Any,
    ) -> JsonResult:
        prompt = estimate_prompt_tokens(body) if self._started is not None else 0

        def send(backend: Backend) -> Any:
            self._journal_start(
                operation,
                body,
                caller,
                requested,
                route,
                backend,
                False,
                Usage(prompt, 0, prompt, estimated=True),
            )
            return backend.post(
                operation, self._encode(body, raw, backend, route, requested), model=route.name
            )

        try:
            response, state, attempts = await self._attempts(operation, route, caller, send)
            try:
                data = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                bad = UpstreamBadResponse(
                    f"the upstream backend {state.name!r} answered with invalid JSON", backend=state.name
                )
                self.router.broke(state, bad)
                raise bad from None
        except UpstreamError as exc:
            await self._settle(admission, 0)
            self._record_failure(
                operation,
                body,
                caller,
                requested,
                False,
                exc.status_code,
                exc.code or exc.error_type,
                route,
                exc,
            )
            raise
        usage = usage_from(data.get("usage") if isinstance(data, dict) else None)
        if usage is None:  # no usage in the answer: count the prompt and the reply, marked estimated
            prompt = estimate_prompt_tokens(body)
            completion = _completion_tokens(data) if operation != EMBEDDINGS else 0
            usage = Usage(prompt, completion, prompt + completion, estimated=True)
        await self._settle(admission, usage.total_tokens)
        reply = None
        if operation == CHAT and isinstance(data, dict):
            choices = data.get("choices") or []
            if choices and isinstance(choices[0], dict):
                reply = choices[0].get("message")
        self._record(
            operation,
            body,
            caller,
            requested,
            route,
            state,
            attempts,
            stream=False,
            status=200,
            outcome=OUTCOME_OK,
            usage=usage,
            reply=reply,
        )
        headers = dict(admission.headers) if admission is not None else {}
        return JsonResult(response.content, 200, headers)

    async def _forward_stream(
        self,
        operation: str,
        body: dict[str, Any],
        caller: Caller,
        route: ModelRoute,
        requested: str | None,
        azure_style: bool,
        admission: Any,
        on_reply: OnReply | None = None,
    ) -> StreamResult:
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        upstream_body = (
            body
            if wants_usage
            else {
                **body,
                "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
            }
        )

        prompt = estimate_prompt_tokens(body) if self._started is not None else 0

        def send(backend: Backend) -> Any:
            self._journal_start(
                operation,
                body,
                caller,
                requested,
                route,
                backend,
                True,
                Usage(prompt, 0, prompt, estimated=True),
            )
            return backend.open_stream(
                operation, self._encode(upstream_body, None, backend, route, requested), model=route.name
            )

        try:
            upstream, state, attempts = await self._attempts(operation, route, caller, send, hold=True)
        except UpstreamError as exc:
            await self._settle(admission, 0)
            self._record_failure(
                operation,
                body,
                caller,
                requested,
                True,
                exc.status_code,
                exc.code or exc.error_type,
                route,
                exc,
            )
            raise
        frames = self._relay(
            operation,
            body,
            caller,
            requested,
            route,
            state,
            attempts,
            upstream,
            wants_usage,
            azure_style,
            admission,
            on_reply,
        )
        # run the relay up to its first (empty) yield: from here on, closing it always runs its cleanup
        await frames.__anext__()
        headers = dict(admission.headers) if admission is not None else {}
        return StreamResult(frames, headers)

    async def _relay(
        self,
        operation: str,
        body: dict[str, Any],
        caller: Caller,
        requested: str | None,
        route: ModelRoute,
        state: BackendState,
        attempts: int,
        upstream: UpstreamStream,
        wants_usage: bool,
        azure_style: bool,
        admission: Any,
        on_reply: OnReply | None = None,
    ) -> AsyncIterator[bytes]:
        """Pass the upstream's events through as they arrive, keeping the shapes clients rely on.

        The record is handed to the recorder (journaled) before the final `data: [DONE]` goes out; while
        the stream runs, its provisional record is journaled again with the tokens relayed so far."""
        chat = operation == CHAT
        texts: dict[int, list[str]] = {}
        tool_calls: dict[int, dict[str, Any]] = {}
        usage: Usage | None = None
        held: dict[str, Any] | None = None  # fields of an empty-choices chunk, folded into the next one
        first_token: float | None = None
        outcome: str = OUTCOME_CLIENT_DISCONNECTED
        error_type: str | None = "client_disconnected"
        final: tuple[Usage, dict[str, Any] | None] | None = None  # set once the record is submitted
        journal = self._started is not None
        next_progress = 0.0

        def finish() -> tuple[Usage, dict[str, Any] | None]:
            final_usage = usage or self._stream_estimate(body, texts, tool_calls)
            reply: dict[str, Any] | None = None
            if chat:
                text = "".join(texts.get(0, []))
                reply = {"role": "assistant", "content": text or None}
                if tool_calls:
                    reply["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
            ttft = (first_token - caller.started) * 1000 if first_token is not None else None
            caller.log["outcome"] = outcome
            self._record(
                operation,
                body,
                caller,
                requested,
                route,
                state,
                attempts,
                stream=True,
                status=200,
                outcome=outcome,
                usage=final_usage,
                reply=reply,
                error_type=error_type,
                ttft_ms=ttft,
            )
            return final_usage, reply

        try:
            yield b""  # consumed by _forward_stream (see there)
            async for payload in upstream:
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise UpstreamBadResponse(
                        f"the upstream backend {state.name!r} sent a malformed stream event",
                        backend=state.name,
                    ) from None
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk and "choices" not in chunk:
                    # an error event from the upstream: pass it on, then end the stream
                    err = chunk.get("error")
                    error_type = (
                        (err.get("code") or err.get("type")) if isinstance(err, dict) else "upstream_error"
                    )
                    outcome = OUTCOME_ERROR
                    yield b"data: " + payload + b"\n\n"
                    break
                choices = chunk.get("choices")
                if chunk.get("usage"):
                    usage = usage_from(chunk["usage"])
                if not choices:
                    if chunk.get("usage"):
                        if wants_usage:
                            yield b"data: " + payload + b"\n\n"
                        continue
                    if azure_style:
                        yield b"data: " + payload + b"\n\n"
                    else:
                        held = {**(held or {}), **{k: v for k, v in chunk.items() if k != "choices"}}
                    continue
                self._accumulate(chunk, choices, chat, texts, tool_calls)
                if journal and (texts or tool_calls):
                    now = time.perf_counter()
                    if now >= next_progress:  # the first text, then once a PROGRESS_INTERVAL
                        next_progress = now + PROGRESS_INTERVAL
                        self._journal_start(
                            operation,
                            body,
                            caller,
                            requested,
                            route,
                            state.backend,
                            True,
                            self._stream_estimate(body, texts, tool_calls),
                            status=200,
                        )
                if first_token is None:
                    first_token = time.perf_counter()
                if held is not None:
                    chunk = {**held, **chunk}
                    held = None
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                else:
                    yield b"data: " + payload + b"\n\n"
            else:
                outcome, error_type = OUTCOME_OK, None
            final = finish()
            yield DONE_FRAME
        except UpstreamError as exc:
            outcome, error_type = OUTCOME_ERROR, exc.code or exc.error_type
            self.router.broke(state, exc)
            logger.warning(
                "upstream stream from backend %s broke off: %s",
                state.name,
                exc.message,
                extra={"request_id": caller.request_id},
            )
            yield b"data: " + orjson.dumps(exc.error_body()) + b"\n\n"
            if final is None:
                final = finish()
            yield DONE_FRAME
        finally:
            self.router.release(state)
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
                if final is None:  # the client went away (or something cut the relay short)
                    final = finish()
                final_usage, reply = final
                await self._settle(admission, final_usage.total_tokens)
            if on_reply is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await on_reply(reply, final_usage, outcome)
                    except Exception:
                        logger.exception("storing the streamed reply failed")

    @staticmethod
    def _stream_estimate(
        body: dict[str, Any], texts: dict[int, list[str]], tool_calls: dict[int, dict[str, Any]]
    ) -> Usage:
        """Usage of a stream without a usage chunk: the prompt and what was relayed, marked estimated."""
        completion = sum(count_tokens("".join(parts)) for parts in texts.values())
        completion += sum(
            count_tokens(str(tc.get("function", {}).get("arguments", ""))) for tc in tool_calls.values()
        )
        prompt = estimate_prompt_tokens(body)
        return Usage(prompt, completion, prompt + completion, estimated=True)

    @staticmethod
    def _accumulate(
        chunk: dict[str, Any],
        choices: list[Any],
        chat: bool,
        texts: dict[int, list[str]],
        tool_calls: dict[int, dict[str, Any]],
    ) -> None:
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if chat:
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if content:
                    texts.setdefault(index, []).append(content)
                if index == 0 and delta.get("tool_calls"):
                    for tc in delta["tool_calls"]:
                        slot = tool_calls.setdefault(
                            tc.get("index", 0),
                            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                        )
                        if tc.get("id"):
                            slot["id"] = tc["id"]
                        fn = tc.get("function") or {}
                        if fn.get("name"):
                            slot["function"]["name"] += fn["name"]
                        if fn.get("arguments"):
                            slot["function"]["arguments"] += fn["arguments"]
            else:
                text = choice.get("text")
                if text:
                    texts.setdefault(index, []).append(text)

    async def _settle(self, admission: Any, tokens: int) -> None:
        if admission is None:
            return
        try:
            await admission.settle(tokens)
        except Exception:  # the answer is already decided; a limiter hiccup must not change it
            logger.exception("settling a rate-limit reservation failed")

    # -- records ----------------------------------------------------------------------------------------

    def _messages(self, operation: str, body: dict[str, Any], caller: Caller) -> list[dict[str, Any]] | None:
        if not self.record_content or operation != CHAT:
            return None
        if not caller.record_messages:
            return None
        messages = body.get("messages")
        return messages if isinstance(messages, list) else None

    def _journal_start(
        self,
        operation: str,
        body: dict[str, Any],
        caller: Caller,
        requested: str | None,
        route: ModelRoute,
        backend: Backend,
        stream: bool,
        usage: Usage,
        *,
        status: int = 502,
    ) -> None:
        """Journal what to record if this process dies before the request ends: outcome `interrupted`,
        tokens estimated (the prompt; for a stream, what was relayed so far)."""
        started = self._started
        if started is None:
            return
        recorded = caller.recorded
        base = self._base_record(
            operation, body, caller, requested, stream, status, OUTCOME_INTERRUPTED, "worker_died"
        )
        caller.recorded = recorded  # a provisional record does not count as the request's record
        try:
            started(
                RequestRecord(
                    **base,
                    model=route.name if not route.config.wildcard else requested,
                    provider=backend.provider,
                    backend=backend.name,
                    deployment=backend.upstream_model(requested or route.name),
                    usage=usage,
                )
            )
        except Exception:  # recording must never break serving
            logger.exception("journaling a started request failed")

    def _record(
        self,
        operation: str,
        body: dict[str, Any],
        caller: Caller,
        requested: str | None,
        route: ModelRoute,
        state: BackendState,
        attempts: int,
        *,
        stream: bool,
        status: int,
        outcome: str,
        usage: Usage,
        reply: dict[str, Any] | None,
        error_type: str | None = None,
        ttft_ms: float | None = None,
    ) -> None:
        backend = state.backend
        caller.log.update(backend=backend.name, attempts=attempts, tokens=usage.total_tokens)
        self._submit(
            self._base_record(operation, body, caller, requested, stream, status, outcome, error_type),
            model=route.name if not route.config.wildcard else requested,
            provider=backend.provider,
            backend=backend.name,
            deployment=backend.upstream_model(requested or route.name),
            attempts=attempts,
            usage=usage,
            ttft_ms=ttft_ms,
            request_messages=self._messages(operation, body, caller),
            response_message=reply
            if self.record_content and caller.record_messages and outcome != OUTCOME_ERROR
            else None,
        )

    def _base_record(
        self,
        operation: str,
        body: dict[str, Any],
        caller: Caller,
        requested: str | None,
        stream: bool,
        status: int,
        outcome: str,
        error_type: str | None,
    ) -> dict[str, Any]:
        """The fields every record has, whatever became of the request."""
        caller.recorded = True
        user = body.get("user")
        return {
            "request_id": caller.request_id,
            "created_at": caller.created_at,
            "route": caller.route,
            "operation": OPERATION_NAMES.get(operation, operation),
            "status_code": status,
            "outcome": outcome,
            "error_type": error_type,
            "stream": stream,
            "model_requested": requested,
            "latency_ms": (time.perf_counter() - caller.started) * 1000,
            "key_id": caller.key_id,
            "user": user if isinstance(user, str) else None,
            "client_ip": caller.client_ip,
            "conversation_id": caller.conversation_id,
            "external_conversation_id": caller.external_conversation_id,
            "client_request_id": caller.client_request_id,
        }

    def _record_failure(
        self,
        operation: str,
        body: dict[str, Any],
        caller: Caller,
        requested: str | None,
        stream: bool,
        status: int,
        error_type: str | None,
        route: ModelRoute | None = None,
        exc: UpstreamError | None = None,
    ) -> None:
        backend_name = exc.backend if exc is not None else None
        caller.log.update(backend=backend_name, error=error_type)
        self._submit(
            self._base_record(operation, body, caller, requested, stream, status, OUTCOME_ERROR, error_type),
            model=route.name if route is not None and not route.config.wildcard else None,
            backend=backend_name,
            attempts=int(getattr(exc, "attempts", 1 if exc is not None else 0)),
        )

    def _submit(self, base: dict[str, Any], **fields: Any) -> None:
        try:
            self.recorder.submit(RequestRecord(**base, **fields))
        except Exception:  # recording must never break serving
            logger.exception("handing a record to the recorder failed")

    def record_rejection(
        self, caller: Caller, operation: str, status: int, error_type: str | None, body: dict[str, Any] | None
    ) -> None:
        """Record a request refused before forwarding (validation, auth, limits)."""
        body = body or {}
        model = body.get("model")
        self._record_failure(
            operation,
            body,
            caller,
            model if isinstance(model, str) else None,
            bool(body.get("stream")),
            status,
            error_type,
        )
