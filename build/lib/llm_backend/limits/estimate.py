"""Token estimate reserved before an upstream call: a cheap over-estimate, settled later with real usage."""

from __future__ import annotations

from typing import Any

from llm_backend.tokens import estimate_prompt_tokens

__all__ = ["estimate_prompt_tokens", "estimate_tokens"]


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def estimate_tokens(body: dict[str, Any], default_completion_tokens: int = 1024) -> int:
    """Tokens to reserve for a request: the prompt estimate plus max_completion_tokens (or max_tokens, or
    default_completion_tokens) for each of the n choices."""
    completion = _positive_int(body.get("max_completion_tokens"))
    if completion is None:
        completion = _positive_int(body.get("max_tokens"))
    if completion is None:
        completion = max(0, default_completion_tokens)
    n = _positive_int(body.get("n")) or 1
    return estimate_prompt_tokens(body) + completion * n
