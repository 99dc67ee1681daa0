"""Usage rollups (hourly, daily, callers per day, facets hourly and daily) kept by the recorder, backfilled from the request log;
indexes for the request log page's filters.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 04:30:00

The backfill sums the existing request_log rows into the rollups in this migration (one INSERT … SELECT
per table), so an upgraded install shows its history at once. Rows written by a previous version still
serving during a rolling upgrade miss their rollup: `llm-backend rollups rebuild` recomputes them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BUCKETS = 16  # histogram buckets (llm_backend.db.models.LATENCY_BOUNDS_MS and one above)
_DIMENSIONS = (
    ("model", 255),
    ("key_id", 64),
    ("backend", 255),
    ("operation", 32),
    ("outcome", 32),
    ("error_type", 255),
    ("team_id", 64),
    ("user_id", 64),
)
_CALLER_DIMENSIONS = (("key_id", 64), ("user", 255), ("client_ip", 64))
_FACET_DIMENSIONS = (("facet", 32), ("value", 255), ("outcome", 32), ("error_type", 255))
_FLOATS = {"cost", "latency_ms_sum", "ttft_ms_sum"}
_SUMS = (
    "requests",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "priced",
    "cost",
    "latency_ms_sum",
    "ttft_count",
    "ttft_ms_sum",
    *(f"latency_b{i:02d}" for i in range(_BUCKETS)),
    *(f"ttft_b{i:02d}" for i in range(_BUCKETS)),
)
_CALLER_SUMS = (
    "requests",
    "errors",
    "estimated",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "priced",
    "cost",
)
_NEW_INDEXES = (
    ("ix_request_log_backend_created_at", ["backend", "created_at"]),
    ("ix_request_log_outcome_created_at", ["outcome", "created_at"]),
    ("ix_request_log_user_created_at", ["user", "created_at"]),
    ("ix_request_log_client_ip_created_at", ["client_ip", "created_at"]),
)


def _create(name: str, dimensions: Sequence[tuple[str, int]], sums: Sequence[str]) -> None:
    op.create_table(
        name,
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        *(sa.Column(d, sa.String(length=n), nullable=False) for d, n in dimensions),
        *(
            sa.Column(
                s,
                sa.Float() if s in _FLOATS else sa.BigInteger(),
                server_default=sa.text("0"),
                nullable=False,
            )
            for s in sums
        ),
        sa.PrimaryKeyConstraint("bucket", *(d for d, _ in dimensions), name=f"pk_{name}"),
    )


def upgrade() -> None:
    _create("usage_hourly", _DIMENSIONS, _SUMS)
    _create("usage_daily", _DIMENSIONS, _SUMS)
    _create("usage_callers_daily", _CALLER_DIMENSIONS, _CALLER_SUMS)
    _create("usage_facets_hourly", _FACET_DIMENSIONS, _SUMS)
    _create("usage_facets_daily", _FACET_DIMENSIONS, _SUMS)
    with op.batch_alter_table("request_log", schema=None) as batch_op:
        for name, columns in _NEW_INDEXES:
            batch_op.create_index(name, columns, unique=False)
    _backfill()


def _backfill() -> None:
    """Sum the request log into the rollups (the same statements as `llm-backend rollups rebuild`)."""
    bind = op.get_bind()
    if not bind.execute(sa.text("SELECT 1 FROM request_log LIMIT 1")).first():
        return
    from sqlalchemy.orm import Session

    from llm_backend.db.repositories import RollupRepository

    RollupRepository(Session(bind=bind)).rebuild(keep_pruned=False)  # the rollups are empty yet


def downgrade() -> None:
    with op.batch_alter_table("request_log", schema=None) as batch_op:
        for name, _ in reversed(_NEW_INDEXES):
            batch_op.drop_index(name)
    op.drop_table("usage_facets_daily")
    op.drop_table("usage_facets_hourly")
    op.drop_table("usage_callers_daily")
    op.drop_table("usage_daily")
    op.drop_table("usage_hourly")
