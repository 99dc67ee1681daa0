"""Teams and users: their limits and budgets, memberships, and who a key and a request belong to.

Existing keys keep working unchanged: their new columns are NULL (no team, no user) and not trusted.

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-02 04:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    # JSON everywhere, JSONB on PostgreSQL (as llm_backend.db.base.JSONType)
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
    )


def _limits() -> list[sa.Column]:  # type: ignore[type-arg]
    """The columns teams and users share: allowed models, rate limits, token and money budgets, groups."""
    return [
        sa.Column("allowed_models", _json(), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_parallel", sa.Integer(), nullable=True),
        sa.Column("daily_tokens", sa.BigInteger(), nullable=True),
        sa.Column("monthly_tokens", sa.BigInteger(), nullable=True),
        sa.Column("daily_spend", sa.Float(), nullable=True),
        sa.Column("monthly_spend", sa.Float(), nullable=True),
        sa.Column("groups", _json(), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        *_limits(),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_teams_name", "teams", ["name"], unique=True)
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=512), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=True),
        *_limits(),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_users_issuer_subject", "users", ["issuer", "subject"], unique=True)
    op.create_table(
        "team_members",
        sa.Column("team_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), server_default="member", nullable=False),
        sa.Column("via_groups", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("via_admin", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("team_id", "user_id"),
    )
    op.create_index("ix_team_members_user_id", "team_members", ["user_id"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("team_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("user_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("trusted_ui", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("user_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("team_id", sa.String(length=64), nullable=True))
    op.create_index("ix_request_log_user_id_created_at", "request_log", ["user_id", "created_at"])
    op.create_index("ix_request_log_team_id_created_at", "request_log", ["team_id", "created_at"])
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("team_id", sa.String(length=64), nullable=True))
    op.create_index("ix_conversations_team_id_updated_at", "conversations", ["team_id", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_conversations_team_id_updated_at", table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("team_id")
    op.drop_index("ix_request_log_team_id_created_at", table_name="request_log")
    op.drop_index("ix_request_log_user_id_created_at", table_name="request_log")
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("team_id")
        batch.drop_column("user_id")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("trusted_ui")
        batch.drop_column("user_id")
        batch.drop_column("team_id")
    op.drop_index("ix_team_members_user_id", table_name="team_members")
    op.drop_table("team_members")
    op.drop_index("ux_users_issuer_subject", table_name="users")
    op.drop_table("users")
    op.drop_index("ux_teams_name", table_name="teams")
    op.drop_table("teams")
