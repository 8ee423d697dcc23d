"""Budget reservations per run, and the step estimates calibration learns from.

``budget_reservations`` was created in 0004 but never written (budgets land here), so it
is recreated with the run it belongs to (a finished run releases what its steps still
hold) and when it was made. ``step_estimates`` keeps, per dispatched LLM step attempt,
the uncorrected and corrected estimate next to what the step reported using: the
history the per-(agent, model) correction factors and ``GET /v1/costs/calibration``
are computed from.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(20, 10)


def _reservations(with_run: bool) -> None:
    columns = [
        sa.Column("step_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("budget", sa.String(64), nullable=False),
        sa.Column("window", sa.String(40), nullable=False),
        sa.Column("usd", MONEY, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    ]
    if with_run:
        columns += [
            sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
            sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        ]
    op.create_table("budget_reservations", *columns, sa.PrimaryKeyConstraint("step_id", "attempt", "budget"))
    if with_run:
        op.create_index("ix_budget_reservations_run", "budget_reservations", ["run_id"])


def upgrade() -> None:
    op.drop_table("budget_reservations")
    _reservations(with_run=True)
    op.create_table(
        "step_estimates",
        sa.Column("step_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("route", sa.String(256), nullable=False),
        # before corrections (what factors are learnt from) and after (what was promised)
        sa.Column("raw_prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("raw_completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("est_tokens", sa.BigInteger, nullable=False),
        sa.Column("est_cost_usd", MONEY, nullable=False),
        sa.Column("actual_prompt_tokens", sa.BigInteger, nullable=True),
        sa.Column("actual_completion_tokens", sa.BigInteger, nullable=True),
        sa.Column("actual_cost_usd", MONEY, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("observed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("step_id", "attempt"),
    )
    op.create_index(
        "ix_step_estimates_observed",
        "step_estimates",
        ["tenant_id", "agent", "route", sa.text("observed_at DESC")],
        postgresql_where=sa.text("observed_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table("step_estimates")
    op.drop_table("budget_reservations")
    _reservations(with_run=False)
