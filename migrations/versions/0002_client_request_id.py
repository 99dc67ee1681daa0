"""request_log.client_request_id: the id a client sent (X-Client-Request-Id and its like), searchable.

Our own request id stays the primary key; the client's goes here, so a reused or foreign id neither
merges rows nor hides them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 01:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("client_request_id", sa.String(length=512), nullable=True))
    op.create_index("ix_request_log_client_request_id", "request_log", ["client_request_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_request_log_client_request_id", table_name="request_log")
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("client_request_id")
