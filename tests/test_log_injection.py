"""The text log keeps one record a line: what a client sends cannot forge a line of its own."""

from __future__ import annotations

import logging
import sys

from llm_backend.logs import TextFormatter


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("llm_backend.access", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_control_characters_in_messages_and_fields_are_escaped() -> None:
    line = TextFormatter().format(
        _record(
            "%s %s %s",
            "GET",
            "/v1/x\n2026-12-02 00:00:00,000 INFO llm_backend.access: forged",
            404,
            model="gpt\r\n4\x00",
        )
    )
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert "/v1/x\\x0a2026-12-02" in line
    assert "model=gpt\\x0d\\x0a4\\x00" in line


def test_a_traceback_still_follows_its_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed: %s", "a\nb", request_id="req_1")
        record.exc_info = sys.exc_info()
    text = TextFormatter().format(record)
    first, rest = text.split("\n", 1)
    assert first.endswith("failed: a\\x0ab request_id=req_1")
    assert rest.startswith("Traceback") and "ValueError: boom" in rest
