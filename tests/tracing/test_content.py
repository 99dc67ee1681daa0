"""Captured content: the conventions' message shape, and the bound on each attribute."""

from __future__ import annotations

import orjson

from llm_backend.tracing.otel import _messages, _parts, bounded_json


def test_chat_messages_become_parts() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "not json"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
    ]
    assert _messages(messages) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        # media by its type only, never its data
        {
            "role": "user",
            "parts": [{"type": "text", "content": "What is in this picture?"}, {"type": "image_url"}],
        },
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "c1", "name": "look", "arguments": "not json"}],
        },
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "a cat"}]},
    ]
    assert _parts({"role": "assistant", "content": ""}) == [{"type": "text", "content": ""}]


def test_bounded_json_keeps_small_content_as_it_is() -> None:
    items = _messages([{"role": "user", "content": "hi"}])
    assert orjson.loads(bounded_json(items, 1000)) == items


def test_bounded_json_cuts_long_texts_then_drops_the_earliest_messages() -> None:
    long = _messages([{"role": "user", "content": "y" * 50_000}])
    text = bounded_json(long, 2000)
    assert len(text) <= 2000
    (message,) = orjson.loads(text)
    assert message["parts"][0]["content"].endswith("…")

    many = _messages([{"role": "user", "content": f"message {i} " + "z" * 200} for i in range(20_000)])
    text = bounded_json(many, 4000)
    assert len(text) <= 4000
    kept = orjson.loads(text)
    assert kept and kept[-1]["parts"][0]["content"].startswith(
        "message 19999"
    )  # the latest are kept, in order
    numbers = [int(m["parts"][0]["content"].split()[1]) for m in kept]
    assert numbers == sorted(numbers) and numbers[-1] == 19_999
