"""What steps spent and which tools they called: step_usage, tool_calls.

Both are insert-only records taken from result envelopes (which stay the source of
truth, stored whole in ``envelopes``). One row per (step, attempt, delivery): a failed or
superseded attempt spent money too. The cost ledger and the audit chain build on them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "step_usage",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("delivery", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        # Dollars to 1e-10: sums of many small per-token prices must add up exactly.
        sa.Column("cost_usd", sa.Numeric(20, 10), nullable=False),
        sa.Column("detail", pg.JSONB, nullable=False),
        sa.Column("recorded_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("step_id", "attempt", "delivery"),
    )
    op.create_index("ix_step_usage_run", "step_usage", ["run_id"])
    op.create_table(
        "tool_calls",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("delivery", sa.Integer, nullable=False),
        sa.Column("ordinal", sa.Integer, nullable=False),
        sa.Column("tool", sa.String(256), nullable=False),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("input_hash", sa.String(80), nullable=True),
        sa.Column("output_hash", sa.String(80), nullable=True),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Numeric(20, 10), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started_at", TS, nullable=False),
    )
    op.create_index("ix_tool_calls_run", "tool_calls", ["run_id", "id"])
    op.create_index("uq_tool_calls_call", "tool_calls", ["step_id", "attempt", "delivery", "ordinal"], unique=True)


def downgrade() -> None:
    op.drop_table("tool_calls")
    op.drop_table("step_usage")
