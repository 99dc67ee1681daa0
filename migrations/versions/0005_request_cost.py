"""request_log.cost: what each request cost at the prices of the model that answered.

NULL for the rows written before (and for models without prices): a sum over a period then counts only
the priced requests, which the usage reports say by showing no cost where none is known.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 04:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("cost", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("cost")
