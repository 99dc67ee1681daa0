"""The console sessions table: insert, look up by token hash, delete (one, a subject's, the expired)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from llm_backend.db.models import ConsoleSession


class ConsoleSessionRepository:
    """Console sessions keyed by the sha256 of their token."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, **fields: object) -> ConsoleSession:
        row = ConsoleSession(**fields)
        self.session.add(row)
        self.session.flush()
        return row

    def get(self, token_hash: str) -> ConsoleSession | None:
        return self.session.get(ConsoleSession, token_hash)

    def delete(self, token_hash: str) -> bool:
        result = self.session.execute(sa.delete(ConsoleSession).where(ConsoleSession.id == token_hash))
        return bool(getattr(result, "rowcount", 0))

    def delete_subject(self, subject: str) -> int:
        result = self.session.execute(sa.delete(ConsoleSession).where(ConsoleSession.subject == subject))
        return int(getattr(result, "rowcount", 0) or 0)

    def delete_expired(self, now: datetime) -> int:
        result = self.session.execute(sa.delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
        return int(getattr(result, "rowcount", 0) or 0)

    def count_active(self, now: datetime) -> int:
        stmt = sa.select(sa.func.count()).select_from(ConsoleSession).where(ConsoleSession.expires_at > now)
        return int(self.session.scalar(stmt) or 0)
