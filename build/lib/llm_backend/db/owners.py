"""The response_owners table: which backend created each stored Responses API response."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from llm_backend.db.models import ResponseOwner

_TABLE: Any = ResponseOwner.__table__


def insert_owners(engine: Engine, rows: Sequence[dict[str, Any]]) -> None:
    """Insert owner rows (response_id, model, backend, key_id, conversation_id); existing ids stay as they are."""
    if not rows:
        return
    now = datetime.now(UTC)
    rows = [{**r, "created_at": r.get("created_at") or now} for r in rows]
    with engine.begin() as conn:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            conn.execute(
                postgresql.insert(_TABLE).on_conflict_do_nothing(index_elements=["response_id"]), rows
            )
        elif dialect == "sqlite":
            conn.execute(sqlite.insert(_TABLE).on_conflict_do_nothing(index_elements=["response_id"]), rows)
        else:
            ids = [r["response_id"] for r in rows]
            existing = set(conn.scalars(sa.select(_TABLE.c.response_id).where(_TABLE.c.response_id.in_(ids))))
            fresh = [r for r in rows if r["response_id"] not in existing]
            if fresh:
                conn.execute(sa.insert(_TABLE), fresh)


def find_owner(engine: Engine, response_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                _TABLE.c.response_id,
                _TABLE.c.model,
                _TABLE.c.backend,
                _TABLE.c.key_id,
                _TABLE.c.conversation_id,
            ).where(_TABLE.c.response_id == response_id)
        ).first()
    return dict(row._mapping) if row is not None else None
