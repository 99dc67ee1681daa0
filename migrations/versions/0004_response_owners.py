"""Response owners: the backend that created each stored Responses API response.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "response_owners",
        sa.Column("response_id", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("backend", sa.String(length=255), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("conversation_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("response_id"),
    )
    with op.batch_alter_table("response_owners", schema=None) as batch_op:
        batch_op.create_index("ix_response_owners_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("response_owners", schema=None) as batch_op:
        batch_op.drop_index("ix_response_owners_created_at")
    op.drop_table("response_owners")
