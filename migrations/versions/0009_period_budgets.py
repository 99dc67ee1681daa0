"""Period budgets: a token and/or money budget for a fixed period [period_start, period_end) on api keys,
users and teams (all null: no period budget, as before).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("api_keys", "users", "teams")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch:
            batch.add_column(sa.Column("period_tokens", sa.BigInteger(), nullable=True))
            batch.add_column(sa.Column("period_spend", sa.Float(), nullable=True))
            batch.add_column(sa.Column("period_start", sa.DateTime(timezone=True), nullable=True))
            batch.add_column(sa.Column("period_end", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch:
            batch.drop_column("period_end")
            batch.drop_column("period_start")
            batch.drop_column("period_spend")
            batch.drop_column("period_tokens")
