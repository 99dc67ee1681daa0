"""Usage reports from the request log, shared by the admin API and the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from llm_backend.db.repositories import RequestLogRepository
from llm_backend.db.session import session_scope


def usage_report(
    engine: Any,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
    key_id: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    with session_scope(engine) as session:
        rows = RequestLogRepository(session).usage_summary(
            since=since, until=until, group_by=group_by, key_id=key_id, model=model
        )
    return [dataclasses.asdict(r) for r in rows]
