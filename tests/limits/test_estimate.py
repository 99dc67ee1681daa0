"""The token estimate reserved before an upstream call."""

from __future__ import annotations

from llm_backend.limits import estimate_tokens
from llm_backend.limits.estimate import estimate_prompt_tokens


def test_text_messages() -> None:
    body = {"messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 41}]}
    # ceil(81 / 4) = 21, + 4 per message
    assert estimate_prompt_tokens(body) == 21 + 8
    assert estimate_tokens(body) == 29 + 1024
    assert estimate_tokens(body, default_completion_tokens=0) == 29


def test_parts_and_images() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a" * 8},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                ],
            }
        ],
        "max_tokens": 100,
    }
    assert estimate_tokens(body) == 2 + 4 + 2 * 765 + 100


def test_completion_budget_precedence_and_n() -> None:
    base = {"messages": [{"role": "user", "content": "abcd"}]}  # 1 + 4
    assert estimate_tokens({**base, "max_tokens": 50}) == 55
    assert estimate_tokens({**base, "max_tokens": 50, "max_completion_tokens": 70}) == 75
    assert estimate_tokens({**base, "max_tokens": 50, "n": 3}) == 5 + 150
    assert estimate_tokens({**base, "max_tokens": None}, default_completion_tokens=10) == 15
    assert estimate_tokens({**base, "max_tokens": "lots", "n": 0}, default_completion_tokens=10) == 15


def test_tool_calls_tools_and_legacy_inputs() -> None:
    body = {
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": '{"q":"x"}'}}],
            }
        ],
        "tools": [{"type": "function", "function": {"name": "get"}}],
    }
    assert estimate_prompt_tokens(body) > 4 + 3
    assert estimate_prompt_tokens({"prompt": "z" * 40}) == 10
    assert estimate_prompt_tokens({"input": ["z" * 20, "z" * 20]}) == 10


def test_garbage_is_tolerated() -> None:
    assert estimate_tokens({"messages": "nope"}, default_completion_tokens=5) == 5
    assert estimate_tokens({"messages": [None, 3, {"content": 7}]}, default_completion_tokens=0) == 4
