"""Stream relays: chat/completions chunks (shapes clients rely on) and typed events (Responses API)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import orjson

from llm_backend.recording.records import OUTCOME_CLIENT_DISCONNECTED, OUTCOME_ERROR, OUTCOME_OK, Usage
from llm_backend.services.accounting import Accountant
from llm_backend.services.flight import Flight
from llm_backend.services.operations import chat_usage, response_reply, responses_usage
from llm_backend.tokens import count_tokens
from llm_backend.upstream.base import UpstreamStream
from llm_backend.upstream.errors import UpstreamBadResponse, UpstreamError
from llm_backend.upstream.router import Router

logger = logging.getLogger(__name__)

DONE_FRAME = b"data: [DONE]\n\n"
# The events that end a Responses stream, and the outcome each one records.
_TERMINAL_EVENTS = {
    "response.completed": OUTCOME_OK,
    "response.incomplete": OUTCOME_OK,
    "response.failed": OUTCOME_ERROR,
    "error": OUTCOME_ERROR,
}


async def _on_reply(flight: Flight, reply: dict[str, Any] | None, usage: Usage, outcome: str) -> None:
    if flight.on_reply is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await flight.on_reply(reply, usage, outcome)
        except Exception:
            logger.exception("storing the streamed reply failed")


async def _end(
    flight: Flight,
    upstream: UpstreamStream,
    router: Router,
    accountant: Accountant,
    final: tuple[Usage, dict[str, Any] | None] | None,
    finish: Callable[[], tuple[Usage, dict[str, Any] | None]],
    outcome: str,
) -> None:
    """How every relay ends, whatever ended it: the backend's slot and connection go back, the record is
    submitted if the relay was cut before it could be, the reservation is settled and the reply handed on."""
    assert flight.state is not None
    router.release(flight.state)
    with anyio.CancelScope(shield=True):
        await upstream.aclose()
        if final is None:  # the client went away (or something cut the relay short)
            final = finish()
        usage, reply = final
        await accountant.settle(flight, usage.total_tokens, usage)
    await _on_reply(flight, reply, usage, outcome)


def _broke(router: Router, flight: Flight, exc: UpstreamError) -> None:
    assert flight.state is not None
    router.broke(flight.state, exc)
    logger.warning(
        "upstream stream from backend %s broke off: %s",
        flight.state.name,
        exc.message,
        extra={"request_id": flight.caller.request_id},
    )


async def relay_chunks(
    flight: Flight,
    upstream: UpstreamStream,
    router: Router,
    accountant: Accountant,
    *,
    wants_usage: bool,
    azure_style: bool,
    chat: bool,
) -> AsyncIterator[bytes]:
    """Pass chat/completions chunks through as they arrive, keeping the shapes clients rely on: Azure's
    empty first chunk folded into the next (on the OpenAI-style routes) and the usage chunk we asked for
    dropped unless the client asked for it.

    The record is handed to the recorder (journaled) before the final `data: [DONE]` goes out; while the
    stream runs, its provisional record is journaled again with the tokens relayed so far."""
    state = flight.state
    assert state is not None
    texts: dict[int, list[str]] = {}
    tool_calls: dict[int, dict[str, Any]] = {}
    usage: Usage | None = None
    held: dict[str, Any] | None = None  # fields of an empty-choices chunk, folded into the next one
    first_token: float | None = None
    outcome: str = OUTCOME_CLIENT_DISCONNECTED
    error_type: str | None = "client_disconnected"
    final: tuple[Usage, dict[str, Any] | None] | None = None  # set once the record is submitted
    journal = accountant.started is not None
    next_progress = 0.0
    trace = flight.trace  # None unless tracing is on

    def estimate() -> Usage:
        completion = sum(count_tokens("".join(parts)) for parts in texts.values())
        completion += sum(
            count_tokens(str(tc.get("function", {}).get("arguments", ""))) for tc in tool_calls.values()
        )
        return accountant.estimate(flight, completion)

    def finish() -> tuple[Usage, dict[str, Any] | None]:
        final_usage = usage or estimate()
        reply: dict[str, Any] | None = None
        if chat:
            reply = {"role": "assistant", "content": "".join(texts.get(0, [])) or None}
            if tool_calls:
                reply["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
        accountant.stream_ended(flight, outcome, error_type, final_usage, reply, first_token)
        return final_usage, reply

    try:
        yield b""  # consumed by the forwarder: from here on, closing the relay always runs its cleanup
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
            if trace is not None:
                trace.saw(chunk)
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
            if flight.answered_model is None and isinstance(answered := chunk.get("model"), str) and answered:
                flight.answered_model = answered  # (Azure's first, empty-choices chunk names none)
            if chunk.get("usage"):
                usage = chat_usage(chunk["usage"])
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
            _accumulate(choices, chat, texts, tool_calls)
            if journal and (texts or tool_calls):
                now = time.perf_counter()
                if now >= next_progress:  # the first text, then once a progress interval
                    next_progress = now + accountant.progress_interval()
                    accountant.journal_start(flight, state.backend, estimate(), status=200)
            if first_token is None:
                first_token = time.perf_counter()
            frame = b"data: " + (payload if held is None else orjson.dumps({**held, **chunk})) + b"\n\n"
            # the parsed chunk is not kept while the stream waits for the next one (every held stream would)
            held = chunk = choices = None
            yield frame
        else:
            outcome, error_type = OUTCOME_OK, None
        final = finish()
        yield DONE_FRAME
    except UpstreamError as exc:
        outcome, error_type = OUTCOME_ERROR, exc.code or exc.error_type
        _broke(router, flight, exc)
        yield b"data: " + orjson.dumps(exc.error_body()) + b"\n\n"
        if final is None:
            final = finish()
        yield DONE_FRAME
    finally:
        await _end(flight, upstream, router, accountant, final, finish, outcome)


def _accumulate(
    choices: list[Any], chat: bool, texts: dict[int, list[str]], tool_calls: dict[int, dict[str, Any]]
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


def _event_type(block: bytes, data: dict[str, Any]) -> str:
    kind = data.get("type")
    if isinstance(kind, str):
        return kind
    if block.startswith(b"event:"):
        return block[6 : block.find(b"\n") if b"\n" in block else len(block)].strip().decode("latin-1")
    return ""


_DELTA_EVENT = b"event: response.output_text.delta\n"


def _delta_text(payloads: list[bytes]) -> str:
    """The text of the output_text.delta events relayed (parsed only when needed)."""
    parts = []
    for payload in payloads:
        try:
            delta = orjson.loads(payload).get("delta")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(delta, str):
            parts.append(delta)
    return "".join(parts)


def _sequence_of(payloads: list[bytes]) -> int:
    for payload in payloads:
        try:
            seq = orjson.loads(payload).get("sequence_number")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(seq, int):
            return seq
    return -1


def failed_event(exc: UpstreamError, sequence: int) -> bytes:
    """The `error` event OpenAI ends a Responses stream with when it fails mid-way."""
    err = exc.error_body()["error"]
    event = {
        "type": "error",
        "code": err.get("code"),
        "message": err.get("message"),
        "param": err.get("param"),
        "sequence_number": sequence,
    }
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


async def relay_events(
    flight: Flight, upstream: UpstreamStream, router: Router, accountant: Accountant
) -> AsyncIterator[bytes]:
    """Pass typed events (`event:` + `data:`) through exactly as the upstream sent them, the moment they
    arrive; read usage and the reply from the final `response.*` event. A stream that breaks off or ends
    without a final event ends with an `error` event. `flight.on_response` sees the created response.

    As for chat, the record is handed to the recorder before the last event goes out, and journaled while
    the stream runs."""
    on_response = flight.on_response
    state = flight.state
    assert state is not None
    deltas: list[bytes] = []  # the payloads of the text deltas
    response: dict[str, Any] | None = None
    first_token: float | None = None
    outcome: str = OUTCOME_CLIENT_DISCONNECTED
    error_type: str | None = "client_disconnected"
    sequence = 0
    announced = False
    final: tuple[Usage, dict[str, Any] | None] | None = None  # set once the record is submitted
    journal = accountant.started is not None
    next_progress = 0.0

    def finish() -> tuple[Usage, dict[str, Any] | None]:
        if response is not None and isinstance(response.get("model"), str) and response["model"]:
            flight.answered_model = response["model"]
        read = responses_usage(response.get("usage")) if response is not None else None
        usage = read or accountant.estimate(flight, count_tokens(_delta_text(deltas)))
        reply = response_reply(response) if response is not None and response.get("output") else None
        if reply is None or (reply.get("content") is None and not reply.get("tool_calls")):
            reply = {"role": "assistant", "content": _delta_text(deltas) or None}
        accountant.stream_ended(flight, outcome, error_type, usage, reply, first_token)
        return usage, reply

    try:
        yield b""  # consumed by the forwarder: from here on, closing the relay always runs its cleanup
        pair: Any
        async for pair in upstream:
            block, payload = pair
            if block.startswith(_DELTA_EVENT):
                # the common event, passed on unparsed: its text is read only if the stream has no final
                # response to take usage and the reply from
                if first_token is None:
                    first_token = time.perf_counter()
                deltas.append(payload)
                if journal and (now := time.perf_counter()) >= next_progress:
                    next_progress = now + accountant.progress_interval()
                    estimate = accountant.estimate(flight, count_tokens(_delta_text(deltas)))
                    accountant.journal_start(flight, state.backend, estimate, status=200)
                yield block + b"\n\n"
                continue
            if payload == b"[DONE]":
                yield block + b"\n\n"
                continue
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamBadResponse(
                    f"the upstream backend {state.name!r} sent a malformed stream event", backend=state.name
                ) from None
            if not isinstance(event, dict):
                yield block + b"\n\n"
                continue
            kind = _event_type(block, event)
            seq = event.get("sequence_number")
            if isinstance(seq, int):
                sequence = seq
            if kind == "response.output_text.delta":
                if first_token is None:
                    first_token = time.perf_counter()
                deltas.append(payload)
            elif kind.startswith("response.") and isinstance(event.get("response"), dict):
                response = event["response"]
                if flight.trace is not None:
                    flight.trace.saw(response)
                if not announced and on_response is not None and response.get("id"):
                    announced = True
                    on_response(flight, response)
            if kind in _TERMINAL_EVENTS:
                outcome = _TERMINAL_EVENTS[kind]
                if outcome == OUTCOME_OK:
                    error_type = None
                else:
                    err = (response or {}).get("error") if kind == "response.failed" else event
                    error_type = (
                        str(err.get("code") or err.get("type") or kind) if isinstance(err, dict) else kind
                    )
                final = finish()
                yield block + b"\n\n"
                break
            yield block + b"\n\n"
        else:
            raise UpstreamBadResponse(
                f"the upstream stream from {state.name!r} ended before it was complete", backend=state.name
            )
    except UpstreamError as exc:
        outcome, error_type = OUTCOME_ERROR, exc.code or exc.error_type
        _broke(router, flight, exc)
        if final is None:
            final = finish()
        yield failed_event(exc, max(sequence, _sequence_of(deltas[-1:])) + 1)
    finally:
        await _end(flight, upstream, router, accountant, final, finish, outcome)
