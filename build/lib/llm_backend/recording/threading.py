"""Pure functions behind automatic conversation threading: message normalisation and transcript hashes."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import orjson

logger = logging.getLogger(__name__)

TITLE_MAX_CHARS = 60
_KEPT_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _normalize_content(content: Any) -> Any:
    if isinstance(content, list):
        parts = [p for p in content if not _is_empty(p)]
        if parts and all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            return "\n".join(str(p.get("text") or "") for p in parts)
        return parts
    return content


def _normalize_tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    out: dict[str, Any] = {}
    if call.get("id"):
        out["id"] = call["id"]
    out["type"] = call.get("type") or "function"
    function = call.get("function")
    if isinstance(function, dict):
        out["function"] = {"name": function.get("name"), "arguments": function.get("arguments")}
        out["function"] = {k: v for k, v in out["function"].items() if v is not None}
    return out


def normalize_message(msg: dict[str, Any]) -> dict[str, Any]:
    """A chat message reduced to what identifies it: role, content, name, tool_calls, tool_call_id.

    None/empty fields are dropped; a content list made only of text parts becomes the joined string;
    tool calls are reduced to id/type/function{name, arguments}. Idempotent.
    """
    out: dict[str, Any] = {}
    for key in _KEPT_FIELDS:
        value = msg.get(key)
        if key == "content":
            value = _normalize_content(value)
        elif key == "tool_calls" and isinstance(value, list):
            value = [_normalize_tool_call(c) for c in value]
        if not _is_empty(value):
            out[key] = value
    return out


def canonical_json(value: Any) -> str:
    """Canonical JSON: sorted keys, compact separators, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def transcript_hash(messages: Sequence[dict[str, Any]], *, normalized: bool = False) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, compact, UTF-8) of the normalised messages."""
    items = list(messages) if normalized else [normalize_message(m) for m in messages]
    try:
        data = orjson.dumps(items, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a value orjson does not know: the slower, more forgiving encoder
        data = canonical_json(items).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def content_text(content: Any) -> str:
    """The text of a message content: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def title_from_messages(messages: Sequence[dict[str, Any]], max_chars: int = TITLE_MAX_CHARS) -> str | None:
    """The first user message's text, whitespace collapsed, cut to `max_chars`; None without one."""
    for msg in messages:
        if msg.get("role") == "user":
            text = " ".join(content_text(msg.get("content")).split())
            if text:
                return text[:max_chars]
    return None


def continuation_prefix_lengths(messages: Sequence[dict[str, Any]]) -> list[int]:
    """Lengths of the prefixes of `messages` that may be a recorded transcript, longest first.

    The rule: the messages before the final user turn. Tool-call rounds (… assistant(tool_calls), tool)
    have no new user turn, so the prefix that ends with the last assistant message is a candidate too.
    Empty prefixes are never candidates.
    """
    lengths: set[int] = set()
    roles = [m.get("role") for m in messages]
    if "user" in roles:
        lengths.add(len(roles) - 1 - roles[::-1].index("user"))
    if "assistant" in roles:
        lengths.add(len(roles) - roles[::-1].index("assistant"))
    return sorted((n for n in lengths if 0 < n < len(messages)), reverse=True)


def system_prompt_of(messages: Sequence[dict[str, Any]]) -> str | None:
    """The text of a leading system (or developer) message, which a conversation keeps as its system prompt."""
    if messages and messages[0].get("role") in ("system", "developer"):
        return content_text(messages[0].get("content")) or None
    return None


# The prompts chat UIs send for their own bookkeeping (a title, tags, follow-up suggestions, search
# queries, autocompletion) quote the chat instead of continuing it. Open WebUI's default templates all
# begin with "### Task:" and put the quoted chat in a <chat_history> block; LibreChat's default title
# prompt (its agents' "structured" and "completion" title methods) begins "Analyze this conversation".
_HELPER_OPENINGS = ("### task:", "analyze this conversation and provide:")
_HELPER_MARKERS = ("<chat_history>",)


def is_helper_request(messages: Sequence[dict[str, Any]]) -> bool:
    """Whether a chat request is a UI's helper task (title, tags, follow-ups…) rather than a chat turn.

    The shape: one user message (system messages aside) whose text opens with "### Task:" or quotes the
    chat in a <chat_history> block (Open WebUI's task prompts), or opens as LibreChat's title prompt.
    """
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) != 1 or turns[0].get("role") != "user":
        return False
    text = content_text(turns[0].get("content")).lstrip().lower()
    return text.startswith(_HELPER_OPENINGS) or any(marker in text for marker in _HELPER_MARKERS)


def helper_title(messages: Sequence[dict[str, Any]], reply: dict[str, Any] | None) -> str | None:
    """The chat title a UI's title task got back ({"title": "…"}, as Open WebUI asks for), else None."""
    if reply is None:
        return None
    prompt = content_text(messages[-1].get("content")) if messages else ""
    if "title" not in prompt[:200].lower():  # the task line names what it asks for
        return None
    text = content_text(reply.get("content")).strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except ValueError:
        return None
    title = data.get("title") if isinstance(data, dict) else None
    if not isinstance(title, str) or not title.strip():
        return None
    return " ".join(title.split())[:255]
