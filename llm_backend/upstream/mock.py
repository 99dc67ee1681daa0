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
from llm_backend.upstream.base import CHAT, COMPLETIONS, EMBEDDINGS, Backend, UpstreamResponse, UpstreamStream
from llm_backend.upstream.errors import UpstreamClientError

_FINGERPRINT = "fp_llmb_mock"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class MockBackend(Backend):
    """Answers from this process: the same input always gives the same text."""

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
        if operation == CHAT:
            messages = data.get("messages") or []
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            return _text_of(users[-1].get("content")) if users else ""
        prompt = data.get("prompt") or ""
        return prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)

    def _prompt_tokens(self, operation: str, data: dict[str, Any]) -> int:
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
        if operation not in (CHAT, COMPLETIONS):
            raise UpstreamClientError(
                "streaming is not supported for this operation", status_code=400, body=None, backend=self.name
            )
        return _MockStream(self, operation, data, model)

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
