"""Forwarding: pick a backend for the model, send the request, hand answers and streams back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import orjson

from llm_backend.errors import GatewayError, InvalidRequest, ModelNotFound, NotFound
from llm_backend.recording.records import Usage
from llm_backend.services.accounting import Accountant
from llm_backend.services.flight import (
    Admission,
    Admit,
    Caller,
    Flight,
    JsonResult,
    NullSink,
    OnReply,
    RecordSink,
    StreamResult,
)
from llm_backend.services.operations import CHAT_CHUNKS, CHAT_OP, EVENTS, OPERATIONS, Operation, chat_usage
from llm_backend.services.pricing import PriceBook, model_metadata
from llm_backend.services.streaming import DONE_FRAME, relay_chunks, relay_events
from llm_backend.upstream.base import Backend
from llm_backend.upstream.errors import (
    NoBackendAvailable,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
)
from llm_backend.upstream.router import BackendState, ModelRoute, Router

logger = logging.getLogger(__name__)

__all__ = [
    "DONE_FRAME",
    "Admission",
    "Admit",
    "Caller",
    "JsonResult",
    "NullSink",
    "OnReply",
    "ProxyService",
    "RecordSink",
    "StreamResult",
    "usage_from",
]


def usage_from(data: Any, *, estimated: bool = False) -> Usage | None:
    """The upstream's chat `usage` object as Usage; None when it is missing or not numbers."""
    return chat_usage(data, estimated=estimated)


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
        self.accounts = Accountant(recorder, record_content=record_content, prices=PriceBook(router.models))
        self.recorder: RecordSink = self.accounts.recorder
        self.record_content = record_content

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
            extra = model_metadata(m)  # context window, prices: only what the models file gives
            for name in (m.name, *m.aliases):
                out.append(
                    {"id": name, "object": "model", "created": 1700000000, "owned_by": m.owned_by, **extra}
                )
        return out

    # -- forwarding -------------------------------------------------------------------------------------

    async def forward(
        self,
        operation: str | Operation,
        body: dict[str, Any],
        caller: Caller,
        *,
        raw: bytes | None = None,
        model: str | None = None,
        azure_style: bool = False,
        admit: Admit | None = None,
        record_messages: bool = True,
        on_reply: OnReply | None = None,
        prepare: Callable[[Flight], Any] | None = None,
    ) -> JsonResult | StreamResult:
        """Forward one request. `model` overrides the body's (the Azure-style routes name a deployment).

        `record_messages=False` keeps the content out of the record (the sessions API stores it itself);
        `on_reply(reply, usage, outcome)` is called when a stream ends, with the assembled reply;
        `prepare(flight)` may pin the request to a backend once the model is resolved (Responses API).
        """
        op = operation if isinstance(operation, Operation) else OPERATIONS[operation]
        caller.record_messages = record_messages
        requested = model if model is not None else body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise InvalidRequest("`model` must be a string", param="model")
        caller.log["model"] = requested
        stream = op.stream is not None and bool(body.get("stream"))
        caller.log["stream"] = stream
        flight = Flight(op, caller, body, requested, stream, on_reply=on_reply)
        flight.conversation_id = caller.conversation_id
        try:
            flight.route = route = self.resolve(caller, requested)
            if prepare is not None:
                await prepare(flight)
            if admit is not None:
                flight.admission = await admit(caller, route, body, op)
        except GatewayError as exc:
            flight.route = None  # refused before forwarding: the record names no model
            self.accounts.failed(flight, exc.status_code, exc.code or exc.error_type, exc)
            raise
        try:
            if stream:
                return await self._forward_stream(flight, raw, azure_style)
            return await self._forward_json(flight, raw)
        except BaseException:
            # settling is idempotent: this only matters when something unexpected cut the request short
            with anyio.CancelScope(shield=True):
                await self.accounts.settle(flight, 0)
            raise

    def _encode(self, flight: Flight, body: dict[str, Any], raw: bytes | None, backend: Backend) -> bytes:
        rename = backend.body_model(flight.op.key)
        if rename is not None and body.get("model") != rename:
            return orjson.dumps({**body, "model": rename})
        requested = flight.requested
        if rename is None and backend.provider != "azure" and body.get("model") != requested:
            # Azure-style inbound route (deployment in the path) to an OpenAI-style upstream: name the model
            assert flight.route is not None
            return orjson.dumps(
                {**body, "model": requested if not flight.route.config.wildcard else body.get("model")}
            )
        if raw is not None:
            return raw
        return orjson.dumps(body)

    def _plan(self, flight: Flight) -> list[BackendState]:
        route = flight.route
        assert route is not None
        state = flight.state
        if state is None:
            return self.router.plan(route)
        # pinned to the backend that holds a stored response: that one or none, never another
        now = time.monotonic()
        if not state.available(now):
            raise self._owner_unavailable(flight, max(1.0, state.recovers_at(now) - now))
        return [state]

    def _owner_unavailable(self, flight: Flight, retry_after: float) -> NoBackendAvailable:
        assert flight.state is not None
        exc = NoBackendAvailable(
            f"The backend that holds response '{flight.pinned}' is unavailable; this request can only be "
            "served there. Try again shortly.",
            backend=flight.state.name,
        )
        exc.retry_after = retry_after
        return exc

    async def _attempts(self, flight: Flight, send: Callable[[Backend], Any], *, hold: bool = False) -> Any:
        """Try the route's backends in order, failing over on the errors the model allows.

        With `hold`, the winning backend's slot stays taken (a stream releases it when it ends).
        """
        route = flight.route
        caller = flight.caller
        assert route is not None
        try:
            plan = self._plan(flight)  # raises NoBackendAvailable when every backend is out
        except NoBackendAvailable as exc:
            exc.attempts = 0  # type: ignore[attr-defined]
            raise
        budget = 1 + route.config.retries if flight.pinned is None else 1
        journal = self.accounts.started
        last: UpstreamError | None = None
        attempts = 0
        for state in plan:
            if attempts >= budget:
                break
            if not self.router.acquire(state):
                continue  # filled up (max_parallel) or a probe is already out
            attempts += 1
            started = time.perf_counter()
            if journal is not None:  # what to record should this process die before the request ends
                self.accounts.journal_start(flight, state.backend)
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
            flight.state = state
            flight.attempts = attempts
            return result
        if last is None:
            busy = NoBackendAvailable(
                f"Every backend of model '{route.name}' is busy or unavailable; try again shortly."
            )
            busy.retry_after = 1.0
            busy.attempts = 0  # type: ignore[attr-defined]
            raise busy
        if flight.pinned is not None and last.retryable and not isinstance(last, UpstreamRateLimited):
            now = time.monotonic()
            assert flight.state is not None
            last = self._owner_unavailable(flight, max(1.0, flight.state.recovers_at(now) - now))
        last.attempts = attempts  # type: ignore[attr-defined]
        if isinstance(last, UpstreamRateLimited) and flight.pinned is None:
            # every backend tried is cooling down now: tell the client when the first one is back
            soonest = self.router.earliest_recovery(route)
            if soonest is not None:
                last.retry_after = soonest
        raise last

    async def _forward_json(self, flight: Flight, raw: bytes | None) -> JsonResult:
        op = flight.op
        body = flight.body
        model = flight.route.name if flight.route is not None else ""

        def send(backend: Backend) -> Any:
            return backend.post(op.key, self._encode(flight, body, raw, backend), model=model)

        return await self._answer(flight, send)

    async def call_stored(
        self,
        op: Operation,
        caller: Caller,
        *,
        model: str,
        backend: str,
        response_id: str,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        admit: Admit | None = None,
    ) -> JsonResult:
        """A call on a stored response (`path`, e.g. responses/{id}/cancel), only at the backend holding it."""
        flight = Flight(op, caller, {}, model, False, pinned=response_id)
        flight.conversation_id = caller.conversation_id
        caller.log["model"] = model
        try:
            route = self.router.resolve(model)
            state = self.router.states.get(f"{route.name}/{backend}") if route is not None else None
            if route is None or state is None or not self.may_use(caller, route):
                raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
            flight.route, flight.state = route, state
            if admit is not None:
                flight.admission = await admit(caller, route, flight.body, op)
        except GatewayError as exc:
            flight.route = None
            self.accounts.failed(flight, exc.status_code, exc.code or exc.error_type, exc)
            raise

        def send(target: Backend) -> Any:
            return target.send(method, path, query=query)

        try:
            return await self._answer(flight, send)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.accounts.settle(flight, 0)
            raise

    async def _answer(self, flight: Flight, send: Callable[[Backend], Any]) -> JsonResult:
        """Send a non-streamed request (failing over as the model allows); settle and record its answer."""
        op = flight.op
        try:
            response = await self._attempts(flight, send)
            try:
                data = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                state = flight.state
                assert state is not None
                bad = UpstreamBadResponse(
                    f"the upstream backend {state.name!r} answered with invalid JSON", backend=state.name
                )
                self.router.broke(state, bad)
                raise bad from None
        except UpstreamError as exc:
            await self.accounts.fail(flight, exc.status_code, exc.code or exc.error_type, exc)
            raise
        # no usage in the answer: count the prompt and the reply, marked estimated
        usage = op.usage(data) or self.accounts.estimate(flight, op.answer_tokens(data))
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            flight.answered_model = data["model"]  # e.g. the model Azure's model router chose
        if flight.on_response is not None and isinstance(data, dict):
            flight.on_response(flight, data)
        await self.accounts.finish(flight, usage, op.reply(data))
        headers = dict(flight.admission.headers) if flight.admission is not None else {}
        return JsonResult(response.content, 200, headers)

    async def _forward_stream(self, flight: Flight, raw: bytes | None, azure_style: bool) -> StreamResult:
        op = flight.op
        body = flight.body
        events = op.stream == EVENTS
        model = flight.route.name if flight.route is not None else ""
        wants_usage = True
        upstream_body = body
        if not events:
            raw = None
            options = body.get("stream_options")
            wants_usage = isinstance(options, dict) and options.get("include_usage") is True
            if not wants_usage:
                upstream_body = {
                    **body,
                    "stream_options": {
                        **(options if isinstance(options, dict) else {}),
                        "include_usage": True,
                    },
                }

        def send(backend: Backend) -> Any:
            encoded = self._encode(flight, upstream_body, raw, backend)
            if events:  # typed events: the reader keeps each event's lines as they were sent
                return backend.open_stream(op.key, encoded, model=model, events=True)
            return backend.open_stream(op.key, encoded, model=model)

        try:
            upstream = await self._attempts(flight, send, hold=True)
        except UpstreamError as exc:
            await self.accounts.fail(flight, exc.status_code, exc.code or exc.error_type, exc)
            raise
        if events:
            frames = relay_events(flight, upstream, self.router, self.accounts)
        else:
            frames = relay_chunks(
                flight,
                upstream,
                self.router,
                self.accounts,
                wants_usage=wants_usage,
                azure_style=azure_style,
                chat=op.stream == CHAT_CHUNKS,
            )
        # run the relay up to its first (empty) yield: from here on, closing it always runs its cleanup
        await frames.__anext__()
        headers = dict(flight.admission.headers) if flight.admission is not None else {}
        return StreamResult(frames, headers)

    # -- records ----------------------------------------------------------------------------------------

    def reject(self, caller: Caller, op: Operation, exc: GatewayError) -> None:
        """Record a request of `op` refused before it reached a backend."""
        flight = Flight(op, caller, {}, None, False)
        flight.conversation_id = caller.conversation_id
        self.accounts.failed(flight, exc.status_code, exc.code or exc.error_type, exc)

    def record_rejection(
        self, caller: Caller, operation: str, status: int, error_type: str | None, body: dict[str, Any] | None
    ) -> None:
        """Record a request refused before forwarding (validation, auth, limits)."""
        body = body or {}
        model = body.get("model")
        op = _BY_NAME.get(operation, CHAT_OP)
        flight = Flight(op, caller, body, model if isinstance(model, str) else None, bool(body.get("stream")))
        flight.conversation_id = caller.conversation_id
        self.accounts.failed(flight, status, error_type, operation=operation)


_BY_NAME = {op.name: op for op in OPERATIONS.values()}
