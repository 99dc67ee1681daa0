"""Texts made storable: NUL becomes U+FFFD everywhere in a value, and untouched values are not copied."""

from __future__ import annotations

from datetime import UTC, datetime

from llm_backend.db.models import ApiKey, Conversation, Message
from llm_backend.db.storable import storable, storable_text
from llm_backend.recording.records import RequestRecord, storable_record


def test_storable_replaces_nul_in_strings_keys_and_nesting() -> None:
    value = {"a\x00": ["x\x00y", {"k": ("t\x00",)}, 3, None, True], "plain": "ok"}
    assert storable(value) == {"a\ufffd": ["x\ufffdy", {"k": ("t\ufffd",)}, 3, None, True], "plain": "ok"}
    assert storable_text("a\x00\x00b") == "a\ufffd\ufffdb"
    assert storable_text(None) is None


def test_storable_returns_the_same_object_when_nothing_changes() -> None:
    value = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "n": 1}
    assert storable(value) is value
    record = RequestRecord("req_1", datetime.now(UTC), "/v1/chat/completions", "chat", 200, user="bob")
    assert storable_record(record) is record


def test_storable_record_covers_every_text_field_and_the_messages() -> None:
    record = RequestRecord(
        "req_1",
        datetime.now(UTC),
        "/v1/chat/completions",
        "chat",
        200,
        user="u\x00",
        model_requested="m\x00",
        client_request_id="c\x00",
        request_messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x\x00"}}]}
        ],
        response_message={"role": "assistant", "content": "r\x00"},
    )
    clean = storable_record(record)
    assert (clean.user, clean.model_requested, clean.client_request_id) == ("u\ufffd", "m\ufffd", "c\ufffd")
    assert clean.request_messages == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x\ufffd"}}]}
    ]
    assert clean.response_message == {"role": "assistant", "content": "r\ufffd"}
    assert record.user == "u\x00"  # the original is left alone


def test_models_make_every_text_they_are_given_storable() -> None:
    conv = Conversation(title="t\x00", system_prompt="s\x00", model="m\x00")
    assert (conv.title, conv.system_prompt, conv.model) == ("t\ufffd", "s\ufffd", "m\ufffd")
    conv.title = "again\x00"
    assert conv.title == "again\ufffd"
    msg = Message(role="user", content=[{"type": "text", "text": "x\x00"}], tool_call_id="id\x00")
    assert msg.content == [{"type": "text", "text": "x\ufffd"}] and msg.tool_call_id == "id\ufffd"
    key = ApiKey(name="n\x00", owner="o\x00", allowed_models=["a\x00"])
    assert (key.name, key.owner, key.allowed_models) == ("n\ufffd", "o\ufffd", ["a\ufffd"])
