"""One descriptor per operation: where it goes upstream, how its usage, reply and conversation are read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_backend.limits.estimate import estimate_tokens
from llm_backend.recording.records import Usage
from llm_backend.tokens import count_tokens, estimate_prompt_tokens
from llm_backend.upstream.base import (
    CHAT,
    COMPLETIONS,
    DEPLOYMENT_SCOPED,
    EMBEDDINGS,
    RESPONSES,
    RESPONSES_INPUT_TOKENS,
)

# Stream adapters an operation's streams go through (llm_backend.services.streaming).
CHAT_CHUNKS = "chat_chunks"  # chat chunks: `data:` frames, [DONE], folded empty-choices chunks, deltas
TEXT_CHUNKS = "text_chunks"  # legacy completions chunks: the same frames, `text` instead of deltas
EVENTS = "events"  # typed events (Responses API): `event:` + `data:` passed through as sent


def _no_tokens(data: Any) -> int:
    return 0


@dataclass(frozen=True, slots=True)
class Operation:
    """What the forwarding code needs to know of one operation; it never branches on the name.

    `key` is the upstream path suffix (Backend.post's `operation`); the upstream URL is
    `{base_url}/{key}` for OpenAI-style backends, `{endpoint}/openai/v1/{key}` for Azure's v1 API, and for
    Azure's deployment-style API `{endpoint}/openai/deployments/{deployment}/{key}` when `deployment_scoped`,
    else `{endpoint}/openai/{key}` (both with `?api-version=`).
    """

    key: str
    name: str  # request_log.operation
    usage: Callable[[Any], Usage | None]  # the JSON answer's usage (None: missing, estimate it)
    reply: Callable[[Any], dict[str, Any] | None]  # the assistant message of a JSON answer, to record
    messages: Callable[[dict[str, Any]], list[dict[str, Any]] | None]  # the request's messages, to record
    # tokens the limiter reserves for a request (given DEFAULT_MAX_TOKENS), and the prompt estimate used
    # when the upstream reports no usage
    reserve: Callable[[dict[str, Any], int], int]
    prompt_tokens: Callable[[dict[str, Any]], int] = estimate_prompt_tokens
    # the completion tokens of a JSON answer that came without usage (counted from its text)
    answer_tokens: Callable[[Any], int] = _no_tokens
    stream: str | None = None  # the stream adapter (*_CHUNKS, EVENTS); None: the operation does not stream
    stateful: bool = False  # answers are stored upstream: remember their backend (Responses API)

    @property
    def deployment_scoped(self) -> bool:
        return self.key in DEPLOYMENT_SCOPED


def _int(value: Any) -> int:
    return int(value or 0)


def _read_usage(
    data: Any, prompt: str, completion: str, prompt_details: str, completion_details: str, estimated: bool
) -> Usage | None:
    if not isinstance(data, dict):
        return None
    try:
        p = _int(data.get(prompt))
        c = _int(data.get(completion))
        total = int(data.get("total_tokens") or (p + c))
        pd = data.get(prompt_details) or {}
        cd = data.get(completion_details) or {}
        cached = pd.get("cached_tokens") if isinstance(pd, dict) else None
        reasoning = cd.get("reasoning_tokens") if isinstance(cd, dict) else None
        return Usage(
            p,
            c,
            total,
            int(cached) if cached is not None else None,
            int(reasoning) if reasoning is not None else None,
            estimated,
        )
    except (TypeError, ValueError):
        return None


def chat_usage(data: Any, *, estimated: bool = False) -> Usage | None:
    """A chat/completions/embeddings `usage` object as Usage; None when missing or not numbers."""
    return _read_usage(
        data,
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        estimated,
    )


def responses_usage(data: Any) -> Usage | None:
    """A Responses API `usage` object (input/output tokens and their details) as Usage."""
    return _read_usage(
        data, "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details", False
    )


def _answer_usage(reader: Callable[[Any], Usage | None]) -> Callable[[Any], Usage | None]:
    def read(data: Any) -> Usage | None:
        return reader(data.get("usage")) if isinstance(data, dict) else None

    return read


def _no_usage(data: Any) -> Usage | None:
    return Usage()  # nothing generated, nothing to estimate (token counting)


def _chat_reply(data: Any) -> dict[str, Any] | None:
    if not isinstance(data, dict):
        return None
    choices = data.get("choices") or []
    if choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        return message if isinstance(message, dict) else None
    return None


def _none(data: Any) -> None:
    return None


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else None


# -- the Responses API's items as chat messages (for recording) ---------------------------------------------


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        for field in ("text", "refusal"):
            value = part.get(field)
            if isinstance(value, str):
                return value
    return ""


def _content(content: Any) -> Any:
    """Item content as a chat message's: strings stay, text parts become one string, others stay parts."""
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):
        if all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
            return "".join(_part_text(p) for p in content)
        return content
    return str(content)


_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})


def items_as_messages(items: Any) -> list[dict[str, Any]]:
    """Responses input/output items as chat messages: messages by role, function calls as assistant
    tool calls, function call outputs as tool messages; other item types (reasoning…) are left out."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    if not isinstance(items, list):
        return out
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": str(item.get("role") or "user"), "content": _content(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item.get("name") or "", "arguments": item.get("arguments") or ""},
            }
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": output if isinstance(output, str) else _content(output),
                }
            )
    return out


def _responses_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    messages = items_as_messages(body.get("input"))
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions and not body.get("previous_response_id"):
        messages.insert(0, {"role": "system", "content": instructions})
    return messages or None


def response_reply(response: Any) -> dict[str, Any] | None:
    """The assistant message of a Responses API response object: its output text and function calls."""
    if not isinstance(response, dict):
        return None
    output = response.get("output")
    if not isinstance(output, list):
        return None
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            content = item.get("content")
            if isinstance(content, list):
                texts.extend(_part_text(p) for p in content if isinstance(p, dict))
            elif isinstance(content, str):
                texts.append(content)
        elif item.get("type") == "function_call":
            calls.extend(items_as_messages([item])[0]["tool_calls"])
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        reply["tool_calls"] = calls
    return reply


def _choices_tokens(data: Any) -> int:
    """Estimated completion tokens of a chat/completions answer without `usage`: its text and tool calls."""
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


def _response_tokens(data: Any) -> int:
    """Estimated output tokens of a response object without `usage`: its text and function calls."""
    reply = response_reply(data)
    if reply is None:
        return 0
    total = count_tokens(reply["content"]) if isinstance(reply.get("content"), str) else 0
    for call in reply.get("tool_calls") or ():
        fn = call["function"]
        total += count_tokens(str(fn.get("name") or "")) + count_tokens(str(fn.get("arguments") or ""))
    return total


def _reserve_completion(body: dict[str, Any], default: int) -> int:
    return estimate_tokens(body, default_completion_tokens=default)


def _reserve_input(body: dict[str, Any], default: int) -> int:
    return estimate_tokens(body, default_completion_tokens=0)


def responses_prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt estimate of a Responses request: its input items and instructions as chat messages."""
    shaped: dict[str, Any] = {"messages": _responses_messages(body) or []}
    if body.get("tools"):
        shaped["tools"] = body["tools"]
    return estimate_prompt_tokens(shaped)


def _reserve_response(body: dict[str, Any], default: int) -> int:
    limit = body.get("max_output_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        limit = max(0, default)
    return responses_prompt_tokens(body) + limit


def _reserve_prompt(body: dict[str, Any], default: int) -> int:
    return responses_prompt_tokens(body)


def _reserve_nothing(body: dict[str, Any], default: int) -> int:
    return 0


CHAT_OP = Operation(
    CHAT,
    "chat",
    _answer_usage(chat_usage),
    _chat_reply,
    _chat_messages,
    _reserve_completion,
    answer_tokens=_choices_tokens,
    stream=CHAT_CHUNKS,
)
COMPLETIONS_OP = Operation(
    COMPLETIONS,
    "completions",
    _answer_usage(chat_usage),
    _none,
    lambda body: None,
    _reserve_completion,
    answer_tokens=_choices_tokens,
    stream=TEXT_CHUNKS,
)
EMBEDDINGS_OP = Operation(
    EMBEDDINGS,
    "embeddings",
    _answer_usage(chat_usage),
    _none,
    lambda body: None,
    _reserve_input,  # embeddings produce no completion tokens: reserve only their input
)
RESPONSES_OP = Operation(
    RESPONSES,
    "responses",
    _answer_usage(responses_usage),
    response_reply,
    _responses_messages,
    _reserve_response,
    prompt_tokens=responses_prompt_tokens,
    answer_tokens=_response_tokens,
    stream=EVENTS,
    stateful=True,
)
RESPONSES_INPUT_TOKENS_OP = Operation(
    RESPONSES_INPUT_TOKENS,
    "responses.input_tokens",
    _no_usage,
    _none,
    lambda body: None,
    _reserve_prompt,
)


def _stored(name: str) -> Operation:
    """A call on a stored response (retrieve, delete, cancel, input items): counted by requests, not tokens."""
    return Operation(RESPONSES, name, _no_usage, _none, lambda body: None, _reserve_nothing)


RETRIEVE_OP = _stored("responses.retrieve")
DELETE_OP = _stored("responses.delete")
CANCEL_OP = _stored("responses.cancel")
INPUT_ITEMS_OP = _stored("responses.input_items")

OPERATIONS: dict[str, Operation] = {
    op.key: op for op in (CHAT_OP, COMPLETIONS_OP, EMBEDDINGS_OP, RESPONSES_OP, RESPONSES_INPUT_TOKENS_OP)
}


def operation_of_path(path: str) -> str:
    """The record's operation name for a request path (for requests refused before forwarding)."""
    tail = path.rstrip("/")
    if "/responses" in tail:
        if tail.endswith("/input_tokens"):
            return RESPONSES_INPUT_TOKENS_OP.name
        if tail.endswith("/responses"):
            return RESPONSES_OP.name
        if tail.endswith("/cancel"):
            return CANCEL_OP.name
        if tail.endswith("/input_items"):
            return INPUT_ITEMS_OP.name
        return RETRIEVE_OP.name
    for op in (CHAT_OP, COMPLETIONS_OP, EMBEDDINGS_OP):
        if tail.endswith("/" + op.key):
            return op.name
    return "other"
