"""Planner timers: runs.wake_at (behavior-tree timeouts and retries, conservative re-runs).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("wake_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_runs_wake_at",
        "runs",
        ["wake_at"],
        postgresql_where=sa.text("wake_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_runs_wake_at", table_name="runs")
    op.drop_column("runs", "wake_at")
