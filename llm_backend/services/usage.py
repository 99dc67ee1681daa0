"""Usage reports from the request log, shared by the admin API and the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from llm_backend.db.repositories import ApiKeyRepository, RequestLogRepository
from llm_backend.db.session import session_scope


def usage_report(
    engine: Any,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
    key_id: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Usage rows as dicts; grouped by key, each row names its key (`key_name`, None once deleted)."""
    with session_scope(engine) as session:
        rows = RequestLogRepository(session).usage_summary(
            since=since, until=until, group_by=group_by, key_id=key_id, model=model
        )
        if "key" not in group_by:
            return [dataclasses.asdict(r) for r in rows]
        names = {k.id: k.name for k in ApiKeyRepository(session).list()}  # keys are few; one query
    out = []
    for r in rows:
        row = dataclasses.asdict(r)
        out.append({"key_id": r.key_id, "key_name": names.get(r.key_id) if r.key_id else None, **row})
    return out
