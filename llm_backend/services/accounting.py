"""Settling and recording a forwarded request: the one place a Flight's outcome is settled and recorded."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from llm_backend.recording.records import (
    OUTCOME_ERROR,
    OUTCOME_INTERRUPTED,
    OUTCOME_OK,
    RequestRecord,
    Usage,
)
from llm_backend.services.flight import Flight, NullSink, RecordSink
from llm_backend.services.pricing import PriceBook
from llm_backend.upstream.base import Backend
from llm_backend.upstream.errors import UpstreamError

logger = logging.getLogger(__name__)

#: How often a running stream's provisional record is journaled again, at most (see progress_interval).
PROGRESS_INTERVAL = 1.0
#: Progress entries a second for all running requests of the worker together, at most: an entry costs the
#: event loop about 0.2 ms, so 10,000 held streams at 500 a second took a tenth of a core; at 100 a second
#: each is journaled again every 100 s (a stream cut by a crash is recorded with the tokens as of then).
PROGRESS_PER_S = 100.0


class Accountant:
    """Settles a request's rate-limit reservation and hands its record to the recorder, once each."""

    def __init__(
        self,
        recorder: RecordSink | None = None,
        *,
        record_content: bool = True,
        prices: PriceBook | None = None,
        tracer: Any = None,
    ) -> None:
        self.recorder: RecordSink = recorder or NullSink()
        self.record_content = record_content
        self.prices = prices or PriceBook(())
        self.tracer = tracer  # llm_backend.tracing.otel.Tracer; None unless tracing is on
        # provisional records (journaled when the upstream is asked), if the sink keeps them
        self.started: Callable[[RequestRecord], None] | None = getattr(recorder, "started", None)
        self._running: Callable[[], int] = getattr(recorder, "running", lambda: 0)

    def progress_interval(self) -> float:
        """How long a running stream waits before its provisional record is journaled again with the tokens
        relayed so far: PROGRESS_INTERVAL, stretched so that all running requests together journal at most
        PROGRESS_PER_S entries a second (10,000 held streams would otherwise spend a good part of the
        worker's time on entries only a crash would need)."""
        return max(PROGRESS_INTERVAL, self._running() / PROGRESS_PER_S)

    async def settle(self, flight: Flight, tokens: int, usage: Usage | None = None) -> None:
        """Settle the reservation with the tokens used, and their cost from `usage` when it is known (only
        the first call counts)."""
        if flight.settled:
            return
        flight.settled = True
        admission = flight.admission
        if admission is None:
            return
        try:
            await admission.settle(tokens, usage) if usage is not None else await admission.settle(tokens)
        except Exception:  # the answer is already decided; a limiter hiccup must not change it
            logger.exception("settling a rate-limit reservation failed")

    def estimate(self, flight: Flight, completion_tokens: int = 0) -> Usage:
        """Usage counted by us (marked estimated): the prompt, and what was answered, as far as we know."""
        prompt = flight.op.prompt_tokens(flight.body)
        return Usage(prompt, completion_tokens, prompt + completion_tokens, estimated=True)

    async def finish(self, flight: Flight, usage: Usage, reply: dict[str, Any] | None) -> None:
        """A JSON answer: settle, then record."""
        await self.settle(flight, usage.total_tokens, usage)
        self.answered(flight, outcome=OUTCOME_OK, usage=usage, reply=reply)

    def stream_ended(
        self,
        flight: Flight,
        outcome: str,
        error_type: str | None,
        usage: Usage,
        reply: dict[str, Any] | None,
        first_token: float | None,
    ) -> None:
        """Record a stream, however it ended (before its end goes out; it settles after)."""
        caller = flight.caller
        ttft = (first_token - caller.started) * 1000 if first_token is not None else None
        caller.log["outcome"] = outcome
        self.answered(flight, outcome=outcome, usage=usage, reply=reply, error_type=error_type, ttft_ms=ttft)

    def answered(
        self,
        flight: Flight,
        *,
        outcome: str,
        usage: Usage,
        reply: dict[str, Any] | None,
        error_type: str | None = None,
        ttft_ms: float | None = None,
        status: int = 200,
    ) -> None:
        """Record a request that reached a backend (a stream records this before its end goes out; it
        settles after)."""
        caller = flight.caller
        state = flight.state
        route = flight.route
        assert state is not None and route is not None
        backend = state.backend
        caller.log.update(backend=backend.name, attempts=flight.attempts, tokens=usage.total_tokens)
        content = self.record_content and caller.record_messages
        requested = flight.requested
        self._submit(
            flight,
            self._base_record(flight, status, outcome, error_type),
            reply,
            model=route.name if not route.config.wildcard else requested,
            provider=backend.provider,
            backend=backend.name,
            deployment=backend.upstream_model(requested or route.name),
            attempts=flight.attempts,
            usage=usage,
            cost=self.cost(flight, usage),
            ttft_ms=ttft_ms,
            request_messages=flight.op.messages(flight.body) if content else None,
            response_message=reply if content and outcome != OUTCOME_ERROR else None,
        )

    def journal_start(
        self, flight: Flight, backend: Backend, usage: Usage | None = None, *, status: int = 502
    ) -> None:
        """Journal what to record if this process dies before the request ends: outcome `interrupted`,
        tokens estimated (the prompt; for a stream, what was relayed so far)."""
        started = self.started
        if started is None:
            return
        caller = flight.caller
        route = flight.route
        assert route is not None
        recorded = caller.recorded
        base = self._base_record(flight, status, OUTCOME_INTERRUPTED, "worker_died")
        caller.recorded = recorded  # a provisional record does not count as the request's record
        requested = flight.requested
        try:
            started(
                RequestRecord(
                    **base,
                    model=route.name if not route.config.wildcard else requested,
                    provider=backend.provider,
                    backend=backend.name,
                    deployment=backend.upstream_model(requested or route.name),
                    usage=(usage := usage or self.estimate(flight)),
                    cost=self.cost(flight, usage),
                )
            )
        except Exception:  # recording must never break serving
            logger.exception("journaling a started request failed")

    async def fail(self, flight: Flight, status: int, error_type: str | None, exc: Any = None) -> None:
        """The request failed before an answer (refused, or every upstream attempt failed)."""
        await self.settle(flight, 0)
        self.failed(flight, status, error_type, exc)

    def failed(
        self,
        flight: Flight,
        status: int,
        error_type: str | None,
        exc: Any = None,
        *,
        operation: str | None = None,
    ) -> None:
        """Record a failure (`operation` names it when the request never reached an operation's code)."""
        upstream = exc if isinstance(exc, UpstreamError) else None
        backend_name = upstream.backend if upstream is not None else None
        flight.caller.log.update(backend=backend_name, error=error_type)
        route = flight.route
        self._submit(
            flight,
            self._base_record(flight, status, OUTCOME_ERROR, error_type, operation),
            None,
            model=route.name if route is not None and not route.config.wildcard else None,
            backend=backend_name,
            attempts=int(getattr(upstream, "attempts", 1 if upstream is not None else 0)),
            # no tokens were used: it cost nothing, where the model has prices (None where it has none)
            cost=self.cost(flight, Usage()) if route is not None else None,
        )

    def cost(self, flight: Flight, usage: Usage) -> float | None:
        """What `usage` cost at the prices of the model that answered (the upstream's `model`, where it
        named one), else of the model the request was routed to; None when neither has prices."""
        route = flight.route
        try:
            return self.prices.cost(
                answered=flight.answered_model,
                requested=route.config if route is not None else flight.requested,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
            )
        except Exception:  # pricing must never break recording
            logger.exception("computing a request's cost failed")
            return None

    def _base_record(
        self, flight: Flight, status: int, outcome: str, error_type: str | None, operation: str | None = None
    ) -> dict[str, Any]:
        """The fields every record has, whatever became of the request."""
        caller = flight.caller
        caller.recorded = True
        # a signed-in caller is its token's subject, whatever the body says
        user = caller.identity.subject if caller.identity is not None else flight.body.get("user")
        return {
            "request_id": caller.request_id,
            "created_at": caller.created_at,
            "route": caller.route,
            "operation": operation or flight.op.name,
            "status_code": status,
            "outcome": outcome,
            "error_type": error_type,
            "stream": flight.stream,
            "model_requested": flight.requested,
            "latency_ms": (time.perf_counter() - caller.started) * 1000,
            "key_id": caller.key_id,
            "user": user if isinstance(user, str) else None,
            "user_id": caller.user_id,
            "team_id": caller.team_id,
            "client_ip": caller.client_ip,
            "conversation_id": flight.conversation_id,
            "external_conversation_id": caller.external_conversation_id,
            "client_request_id": caller.client_request_id,
            "continues": flight.continues,
        }

    def _submit(
        self, flight: Flight, base: dict[str, Any], reply: dict[str, Any] | None, **fields: Any
    ) -> None:
        record: RequestRecord | None = None
        try:
            record = RequestRecord(**base, **fields)
            self.recorder.submit(record)
        except Exception:  # recording must never break serving
            logger.exception("handing a record to the recorder failed")
        if (
            self.tracer is not None and record is not None
        ):  # the outcome is settled here: the request's span ends with it
            self.tracer.ended(flight, record, reply)
