"""Conversations keyed by a client's chat id (per owner) and the parent hash that lets threading adopt orphans.

Also fills the system prompt of conversations threaded before it was kept: their first message's text.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 01:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("external_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("parent_hash", sa.String(length=64), nullable=True))
    op.create_index(
        "ux_conversations_owner_external_id", "conversations", ["owner", "external_id"], unique=True
    )
    op.create_index("ix_conversations_parent_hash", "conversations", ["parent_hash"])
    if op.get_bind().dialect.name == "postgresql":
        text, is_text = "m.content #>> '{}'", "jsonb_typeof(m.content) = 'string'"
    else:
        text, is_text = "json_extract(m.content, '$')", "json_type(m.content) = 'text'"
    op.execute(
        "UPDATE conversations SET system_prompt = ("
        f"SELECT {text} FROM messages m WHERE m.conversation_id = conversations.id AND m.position = 0 "
        f"AND m.role IN ('system', 'developer') AND {is_text}) "
        "WHERE system_prompt IS NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_conversations_parent_hash", table_name="conversations")
    op.drop_index("ux_conversations_owner_external_id", table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("parent_hash")
        batch.drop_column("external_id")
