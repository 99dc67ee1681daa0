"""Fixtures of the recording tests: the database fixtures of tests/conftest_db.py and a record factory."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llm_backend.recording.records import RequestRecord, Usage
from tests.conftest_db import backend, db_url, empty_db_url, engine, pg_migrated_url

__all__ = ["backend", "db_url", "empty_db_url", "engine", "make_record", "pg_migrated_url"]

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
_counter = itertools.count()

MakeRecord = Callable[..., RequestRecord]


@pytest.fixture
def make_record() -> MakeRecord:
    """RequestRecord factory: unique request ids, increasing times; keyword arguments override fields."""

    def factory(**overrides: Any) -> RequestRecord:
        n = next(_counter)
        fields: dict[str, Any] = {
            "request_id": f"req-{n:06d}",
            "created_at": T0 + timedelta(seconds=n),
            "route": "/v1/chat/completions",
            "operation": "chat",
            "status_code": 200,
            "model_requested": "gpt-4o",
            "model": "gpt-4o",
            "provider": "mock",
            "usage": Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
            "latency_ms": 20.0,
        }
        fields.update(overrides)
        return RequestRecord(**fields)

    return factory
