"""The built-in mock model: deterministic OpenAI-shaped answers and token-by-token streams, no network."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from llm_backend.tokens import count_tokens
from llm_backend.upstream.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    RESPONSES_INPUT_TOKENS,
    Backend,
    UpstreamResponse,
    UpstreamStream,
)
from llm_backend.upstream.errors import UpstreamClientError

_FINGERPRINT = "fp_llmb_mock"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _input_text(value: Any) -> str:
    """The text of the last user turn of a Responses API `input` (a string or a list of items)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in reversed(value):
            if isinstance(item, dict) and item.get("role", "user") == "user" and "content" in item:
                content = item["content"]
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(
                        str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
                    )
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                return f"the tool said {item.get('output')}"
    return ""


def _not_found(response_id: str, backend: str) -> UpstreamClientError:
    message = f"Response with id '{response_id}' not found."
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return UpstreamClientError(message, status_code=404, body=body, backend=backend)


class MockBackend(Backend):
    """Answers from this process: the same input always gives the same text."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # the Responses API's stored responses (and their input items), in this process only
        self._stored: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    def _reply(self, prompt: str, index: int) -> str:
        words = prompt.split()
        topic = " ".join(words[:12]) if words else "nothing"
        suffix = f" (choice {index + 1})" if index else ""
        return (
            f"This is the llm-backend mock model answering{suffix}. You said: {topic}. "
            "Configure an Azure OpenAI or OpenAI backend to get real answers."
        )

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamClientError(
                "invalid JSON body", status_code=400, body=None, backend=self.name
            ) from None
        return data if isinstance(data, dict) else {}

    def _prompt(self, operation: str, data: dict[str, Any]) -> str:
        if operation in (RESPONSES, RESPONSES_INPUT_TOKENS):
            return _input_text(data.get("input"))
        if operation == CHAT:
            messages = data.get("messages") or []
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            return _text_of(users[-1].get("content")) if users else ""
        prompt = data.get("prompt") or ""
        return prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)

    def _prompt_tokens(self, operation: str, data: dict[str, Any]) -> int:
        if operation in (RESPONSES, RESPONSES_INPUT_TOKENS):
            raw = data.get("input")
            items = [{"content": raw}] if isinstance(raw, str) else raw if isinstance(raw, list) else []
            text = " ".join(
                str(i.get("content") or i.get("output") or "") for i in items if isinstance(i, dict)
            )
            instructions = data.get("instructions")
            return 4 * len(items) + count_tokens(
                text + (instructions if isinstance(instructions, str) else "")
            )
        if operation == CHAT:
            return sum(
                4 + count_tokens(_text_of(m.get("content")))
                for m in data.get("messages") or []
                if isinstance(m, dict)
            )
        return count_tokens(self._prompt(operation, data))

    def _model(self, data: dict[str, Any], model: str) -> str:
        return self.config.model or str(data.get("model") or model)

    async def post(self, operation: str, body: bytes, *, model: str) -> UpstreamResponse:
        data = self._parse(body)
        if operation == RESPONSES:
            response = self._response(data, model)
            return UpstreamResponse(200, orjson.dumps(response), {})
        if operation == RESPONSES_INPUT_TOKENS:
            tokens = {"object": "response.input_tokens", "input_tokens": self._prompt_tokens(operation, data)}
            return UpstreamResponse(200, orjson.dumps(tokens), {})
        if operation == EMBEDDINGS:
            return UpstreamResponse(200, orjson.dumps(self._embeddings(data, model)), {})
        n = int(data.get("n") or 1)
        prompt = self._prompt(operation, data)
        replies = [self._reply(prompt, i) for i in range(n)]
        prompt_tokens = self._prompt_tokens(operation, data)
        completion_tokens = sum(count_tokens(r) for r in replies)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        created = int(time.time())
        if operation == CHAT:
            result: dict[str, Any] = {
                "id": f"chatcmpl-mock{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": created,
                "model": self._model(data, model),
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": r, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                    for i, r in enumerate(replies)
                ],
                "usage": usage,
                "system_fingerprint": _FINGERPRINT,
            }
        else:
            result = {
                "id": f"cmpl-mock{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": created,
                "model": self._model(data, model),
                "choices": [
                    {"index": i, "text": r, "logprobs": None, "finish_reason": "stop"}
                    for i, r in enumerate(replies)
                ],
                "usage": usage,
            }
        return UpstreamResponse(200, orjson.dumps(result), {})

    async def open_stream(
        self, operation: str, body: bytes, *, model: str, events: bool = False
    ) -> UpstreamStream:
        data = self._parse(body)
        if operation == RESPONSES and events:
            return _MockEventStream(self, data, model)
        if operation not in (CHAT, COMPLETIONS):
            raise UpstreamClientError(
                "streaming is not supported for this operation", status_code=400, body=None, backend=self.name
            )
        return _MockStream(self, operation, data, model)

    # -- the Responses API ------------------------------------------------------------------------------

    def _response(self, data: dict[str, Any], model: str, *, status: str = "completed") -> dict[str, Any]:
        """A complete response object (stored unless `store: false`)."""
        text = self._reply(self._prompt(RESPONSES, data), 0) if status == "completed" else ""
        rid = f"resp_mock{uuid.uuid4().hex}"
        prompt_tokens = self._prompt_tokens(RESPONSES, data)
        output_tokens = count_tokens(text)
        message = {
            "id": f"msg_mock{uuid.uuid4().hex[:24]}",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        response: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": data.get("instructions"),
            "max_output_tokens": data.get("max_output_tokens"),
            "model": self._model(data, model),
            "output": [message] if status == "completed" else [],
            "parallel_tool_calls": True,
            "previous_response_id": data.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": data.get("store", True) is not False,
            "temperature": data.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": data.get("tool_choice", "auto"),
            "tools": data.get("tools") or [],
            "top_p": data.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + output_tokens,
            },
            "user": data.get("user"),
            "metadata": data.get("metadata") or {},
        }
        if status == "completed" and response["store"]:
            raw = data.get("input")
            items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else raw
            inputs = [
                {"id": f"msg_in{i}{rid[-8:]}", "type": "message", "status": "completed", **item}
                if isinstance(item, dict) and item.get("type", "message") == "message"
                else item
                for i, item in enumerate(items if isinstance(items, list) else [])
            ]
            self._stored[rid] = (response, inputs)
        return response

    async def send(
        self, method: str, path: str, body: bytes | None = None, *, query: Any = None
    ) -> UpstreamResponse:
        parts = path.split("/")  # responses/{id}[/cancel|/input_items]
        stored = self._stored.get(parts[1]) if len(parts) > 1 and parts[0] == RESPONSES else None
        if stored is None:
            raise _not_found(parts[1] if len(parts) > 1 else path, self.name)
        response, inputs = stored
        if method == "DELETE":
            del self._stored[parts[1]]
            return UpstreamResponse(
                200, orjson.dumps({"id": parts[1], "object": "response", "deleted": True}), {}
            )
        if parts[-1] == "cancel":
            message = "Only responses created with background=true can be cancelled."
            raise UpstreamClientError(
                message,
                status_code=400,
                body={
                    "error": {
                        "message": message,
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                backend=self.name,
            )
        if parts[-1] == "input_items":
            data = list(reversed(inputs)) if (query or {}).get("order", "desc") == "desc" else list(inputs)
            page = {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data and isinstance(data[0], dict) and "id" in data[0] else None,
                "last_id": data[-1]["id"]
                if data and isinstance(data[-1], dict) and "id" in data[-1]
                else None,
                "has_more": False,
            }
            return UpstreamResponse(200, orjson.dumps(page), {})
        return UpstreamResponse(200, orjson.dumps(response), {})

    def _embeddings(self, data: dict[str, Any], model: str) -> dict[str, Any]:
        raw = data.get("input", "")
        inputs = raw if isinstance(raw, list) else [raw]
        dims = int(data.get("dimensions") or 16)
        as_base64 = data.get("encoding_format") == "base64"
        items = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = (
                item
                if isinstance(item, str)
                else " ".join(str(x) for x in item)
                if isinstance(item, list)
                else str(item)
            )
            tokens += count_tokens(text)
            vector = _vector(text, dims)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            )
            items.append({"object": "embedding", "index": i, "embedding": embedding})
        return {
            "object": "list",
            "data": items,
            "model": self._model(data, model),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _vector(text: str, dims: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    vec = out[:dims]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vec]


class _MockStream(UpstreamStream):
    def __init__(self, backend: MockBackend, operation: str, data: dict[str, Any], model: str) -> None:
        self._backend = backend
        self._operation = operation
        self._data = data
        self._model = model
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        b = self._backend
        data = self._data
        chat = self._operation == CHAT
        n = int(data.get("n") or 1)
        replies = [b._reply(b._prompt(self._operation, data), i) for i in range(n)]
        created = int(time.time())
        cid = f"chatcmpl-mock{uuid.uuid4().hex[:24]}" if chat else f"cmpl-mock{uuid.uuid4().hex[:24]}"
        model = b._model(data, self._model)
        delay = b.config.delay_ms / 1000.0
        base: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }
        if chat:
            base["system_fingerprint"] = _FINGERPRINT
            for i in range(n):
                yield orjson.dumps(
                    {
                        **base,
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
        pieces = [r.split(" ") for r in replies]
        for step in range(max(len(p) for p in pieces)):
            if self._closed:
                return
            if delay:
                await asyncio.sleep(delay)
            for i, words in enumerate(pieces):
                if step >= len(words):
                    continue
                token = words[step] if step == 0 else " " + words[step]
                choice: dict[str, Any] = (
                    {"index": i, "delta": {"content": token}, "logprobs": None, "finish_reason": None}
                    if chat
                    else {"index": i, "text": token, "logprobs": None, "finish_reason": None}
                )
                yield orjson.dumps({**base, "choices": [choice]})
        for i in range(n):
            done: dict[str, Any] = (
                {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}
                if chat
                else {"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}
            )
            yield orjson.dumps({**base, "choices": [done]})
        options = data.get("stream_options") or {}
        if options.get("include_usage"):
            prompt_tokens = b._prompt_tokens(self._operation, data)
            completion_tokens = sum(count_tokens(r) for r in replies)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            yield orjson.dumps({**base, "choices": [], "usage": usage})

    async def aclose(self) -> None:
        self._closed = True


class _MockEventStream(UpstreamStream):
    """The Responses API's event sequence, from response.created to response.completed (with usage)."""

    def __init__(self, backend: MockBackend, data: dict[str, Any], model: str) -> None:
        self._backend = backend
        self._data = data
        self._model = model
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[Any]:  # type: ignore[override]
        b = self._backend
        final = b._response(self._data, self._model)
        message = final["output"][0]
        text = message["content"][0]["text"]
        start = {**final, "status": "in_progress", "output": [], "usage": None}
        item_id = message["id"]
        delay = b.config.delay_ms / 1000.0
        seq = 0

        def event(kind: str, **fields: Any) -> tuple[bytes, bytes]:
            nonlocal seq
            data = orjson.dumps({"type": kind, "sequence_number": seq, **fields})
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + data, data

        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        empty_item = {**message, "status": "in_progress", "content": []}
        yield event("response.output_item.added", output_index=0, item=empty_item)
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event(
            "response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part
        )
        for i, word in enumerate(text.split(" ")):
            if self._closed:
                return
            if delay:
                await asyncio.sleep(delay)
            yield event(
                "response.output_text.delta",
                item_id=item_id,
                output_index=0,
                content_index=0,
                delta=word if i == 0 else " " + word,
                logprobs=[],
            )
        yield event(
            "response.output_text.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
        )
        yield event(
            "response.content_part.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            part={**part, "text": text},
        )
        yield event("response.output_item.done", output_index=0, item=message)
        yield event("response.completed", response=final)

    async def aclose(self) -> None:
        self._closed = True
