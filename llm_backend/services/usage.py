"""Usage reports from the request log, shared by the admin API and the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from llm_backend.db.repositories import ApiKeyRepository, RequestLogRepository
from llm_backend.db.session import session_scope
from llm_backend.services.pricing import round_cost


def _row(row: Any) -> dict[str, Any]:
    """A usage row as a dict, its cost sum without the float noise of adding many rows."""
    out = dataclasses.asdict(row)
    out["cost"] = round_cost(row.cost)
    return out


def usage_report(
    engine: Any,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
    key_id: str | None = None,
    model: str | None = None,
    client_request_id: str | None = None,
) -> list[dict[str, Any]]:
    """Usage rows as dicts; grouped by key, each row names its key (`key_name`, None once deleted)."""
    with session_scope(engine) as session:
        rows = RequestLogRepository(session).usage_summary(
            since=since,
            until=until,
            group_by=group_by,
            key_id=key_id,
            model=model,
            client_request_id=client_request_id,
        )
        if "key" not in group_by:
            return [_row(r) for r in rows]
        names = {k.id: k.name for k in ApiKeyRepository(session).list()}  # keys are few; one query
    out = []
    for r in rows:
        row = _row(r)
        out.append({"key_id": r.key_id, "key_name": names.get(r.key_id) if r.key_id else None, **row})
    return out


_REQUEST_FIELDS = (
    "request_id",
    "client_request_id",
    "route",
    "operation",
    "status_code",
    "outcome",
    "error_type",
    "stream",
    "model_requested",
    "model",
    "backend",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_estimated",
    "cost",
    "latency_ms",
    "ttft_ms",
    "key_id",
    "user",
    "conversation_id",
)


def request_list(
    engine: Any,
    since: datetime,
    until: datetime,
    *,
    client_request_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Recorded requests, newest first (the admin API's /admin/requests): what became of a request, found by
    the id its client gave it."""
    with session_scope(engine) as session:
        rows = RequestLogRepository(session).search(
            since=since,
            until=until,
            client_request_id=client_request_id,
            key_id=key_id,
            model=model,
            limit=limit,
        )
        return [
            {
                "object": "request",
                **{f: getattr(r, f) for f in _REQUEST_FIELDS},
                "created_at": r.created_at.isoformat(),
            }
            for r in rows
        ]
