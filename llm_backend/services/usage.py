"""Usage reports from the request log, shared by the admin API and the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from llm_backend.db.repositories import (
    ApiKeyRepository,
    RequestLogRepository,
    TeamRepository,
    UserRepository,
)
from llm_backend.db.session import session_scope


def usage_report(
    engine: Any,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
    key_id: str | None = None,
    model: str | None = None,
    client_request_id: str | None = None,
    *,
    user_id: str | None = None,
    team_id: str | None = None,
) -> list[dict[str, Any]]:
    """Usage rows as dicts; grouped by key, each row names its key (`key_name`, None once deleted), by
    team its team (`team_name`), by user_id its user (`user_email`)."""
    with session_scope(engine) as session:
        rows = RequestLogRepository(session).usage_summary(
            since=since,
            until=until,
            group_by=group_by,
            key_id=key_id,
            model=model,
            client_request_id=client_request_id,
            user_id=user_id,
            team_id=team_id,
        )
        names = {k.id: k.name for k in ApiKeyRepository(session).list()} if "key" in group_by else {}
        teams = {t.id: t.name for t in TeamRepository(session).list()} if "team" in group_by else {}
        wanted = {r.user_id for r in rows if r.user_id} if "user_id" in group_by else set()
        emails = {u.id: u.email for u in (UserRepository(session).get(i) for i in wanted) if u is not None}
    out = []
    for r in rows:
        row = dataclasses.asdict(r)
        if "user_id" not in group_by:
            row.pop("user_id")
        if "team" not in group_by:
            row.pop("team_id")
        if "key" in group_by:
            row = {"key_id": r.key_id, "key_name": names.get(r.key_id) if r.key_id else None, **row}
        if "team" in group_by:
            row["team_name"] = teams.get(r.team_id) if r.team_id else None
        if "user_id" in group_by:
            row["user_email"] = emails.get(r.user_id) if r.user_id else None
        out.append(row)
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
    "latency_ms",
    "ttft_ms",
    "key_id",
    "user",
    "user_id",
    "team_id",
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


_DETAIL_EXTRA = ("provider", "deployment", "cached_tokens", "reasoning_tokens", "client_ip")


def request_detail(engine: Any, request_id: str) -> dict[str, Any] | None:
    """One recorded request with everything the log holds of it and, where content recording kept them, the
    messages it sent (its conversation up to this request) and received, those it added marked `new`;
    None when there is no such request."""
    from llm_backend.db.repositories import ConversationRepository

    with session_scope(engine) as session:
        row = RequestLogRepository(session).get(request_id)
        if row is None:
            return None
        out: dict[str, Any] = {
            "object": "request",
            **{f: getattr(row, f) for f in (*_REQUEST_FIELDS, *_DETAIL_EXTRA)},
            "created_at": row.created_at.isoformat(),
            "cost": getattr(row, "cost", None),
            "messages": [],
        }
        if row.conversation_id:
            messages = ConversationRepository(session).messages(row.conversation_id)
            own = [i for i, m in enumerate(messages) if m.request_id == request_id]
            if own:
                out["messages"] = [
                    {**m.to_dict(), "position": m.position, "new": m.request_id == request_id}
                    for m in messages[: own[-1] + 1]
                ]
        return out
