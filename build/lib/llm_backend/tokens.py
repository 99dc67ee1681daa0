"""Token counts without a tokenizer: about four characters a token, for estimates and the mock model."""

from __future__ import annotations

import json
import math
from typing import Any

#: What a (high-detail) image costs in OpenAI's accounting, used flat for every image part.
IMAGE_TOKENS = 765
#: Per-message overhead of the chat format (role, separators).
MESSAGE_OVERHEAD_TOKENS = 4
CHARS_PER_TOKEN = 4
_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})


def _text_chars(value: Any) -> tuple[int, int]:
    """Characters of text and number of images in a message content (a string or a list of parts)."""
    if isinstance(value, str):
        return len(value), 0
    chars = images = 0
    if isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, dict):
                if part.get("type") in _IMAGE_PART_TYPES:
                    images += 1
                else:
                    for field in ("text", "refusal"):
                        text = part.get(field)
                        if isinstance(text, str):
                            chars += len(text)
    return chars, images


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens: characters / 4 over all message text (and prompt/input/tools), +4 per message,
    765 per image."""
    chars = images = 0
    messages = body.get("messages")
    count = 0
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            count += 1
            c, i = _text_chars(message.get("content"))
            chars += c
            images += i
            name = message.get("name")
            if isinstance(name, str):
                chars += len(name)
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    fn = call["function"]
                    chars += len(str(fn.get("name", ""))) + len(str(fn.get("arguments", "")))
    # Legacy completions (prompt) and embeddings (input): a string or a list of strings.
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            chars += sum(len(v) if isinstance(v, str) else len(str(v)) for v in value)
    tools = body.get("tools")
    if tools:
        chars += len(json.dumps(tools, separators=(",", ":"), default=str))
    return math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * count + IMAGE_TOKENS * images


def count_tokens(text: str) -> int:
    """Tokens of a text: about four characters a token, at least one for any text."""
    return max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN) if text else 0
