"""Usage reports and the request list, shared by the admin API and the CLI: thin names over analytics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from llm_backend.services.analytics import RequestFilter, request_page, usage_report

__all__ = ["request_list", "usage_report"]


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
    """Recorded requests, newest first: what became of a request, found by the id its client gave it."""
    filters = RequestFilter(
        since=since, until=until, client_request_id=client_request_id, key_id=key_id, model=model
    )
    return request_page(engine, filters, limit=limit).items
