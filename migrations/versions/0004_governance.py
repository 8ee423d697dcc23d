"""Governance: the per-tenant audit chain, the cost ledger, budgets and run estimates.

``audits`` is forward-only: a trigger refuses UPDATE, DELETE and TRUNCATE, so even the
application's own role cannot rewrite history (a superuser can disable the trigger, which
is why the chain is hashed and anchored outside the database). Later migrations must
never touch its rows. Changes write their entries to ``audit_queue`` in their own
transaction; the sealer moves them into ``audits``, linked, holding the tenant's
``audit_heads`` row (so tenants never wait for each other, and no engine transaction waits
for a chain lock).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(20, 10)


def upgrade() -> None:
    op.create_table(
        "audits",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource", sa.String(512), nullable=False),
        sa.Column("data", pg.JSONB, nullable=False),
        sa.Column("prev_hash", sa.String(80), nullable=False),
        sa.Column("hash", sa.String(80), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "seq"),
    )
    op.create_index("ix_audits_action", "audits", ["tenant_id", "action", "seq"])
    op.create_index("ix_audits_ts", "audits", ["tenant_id", "ts"])
    # The run filter reads the hashed data itself (no unhashed copy to tamper with).
    op.execute("CREATE INDEX ix_audits_run ON audits (tenant_id, (data->>'run'), seq) WHERE data ? 'run'")
    op.execute(
        """
        CREATE FUNCTION agentflow_audits_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit entries are append-only (% refused)', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audits_forward_only BEFORE UPDATE OR DELETE ON audits "
        "FOR EACH ROW EXECUTE FUNCTION agentflow_audits_forward_only()"
    )
    op.execute(
        "CREATE TRIGGER audits_no_truncate BEFORE TRUNCATE ON audits "
        "FOR EACH STATEMENT EXECUTE FUNCTION agentflow_audits_forward_only()"
    )
    # Entries wait here, written by the transaction of the change they record, until the
    # sealer links them into their tenant's chain (within a fraction of a second), so no
    # hot-path transaction ever holds a chain lock. Rows are only inserted and, by the
    # sealer in the transaction that chains them, deleted; UPDATE is refused.
    op.create_table(
        "audit_queue",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource", sa.String(512), nullable=False),
        sa.Column("data", pg.JSONB, nullable=False),
    )
    op.create_index("ix_audit_queue_tenant", "audit_queue", ["tenant_id", "id"])
    op.execute(
        "CREATE TRIGGER audit_queue_no_update BEFORE UPDATE ON audit_queue "
        "FOR EACH ROW EXECUTE FUNCTION agentflow_audits_forward_only()"
    )
    op.create_table(
        "audit_heads",
        sa.Column("tenant_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(80), nullable=False),
        sa.Column("anchored_seq", sa.BigInteger, server_default="0", nullable=False),
    )

    op.create_table(
        "cost_ledger",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("workflow", sa.String(128), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("step_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("delivery", sa.Integer, nullable=False),
        # 'llm' or 'tool', and its ordinal among the attempt's calls of that kind
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("ordinal", sa.Integer, nullable=False),
        sa.Column("agent", sa.String(128), nullable=False),
        # the model route (llm) or the tool id (tool)
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_usd", MONEY, nullable=False),
        # the step's preflight estimate, on the attempt's first row (NULL elsewhere)
        sa.Column("estimated_usd", MONEY, nullable=True),
        sa.Column("estimated_tokens", sa.BigInteger, nullable=True),
        sa.Column("at", TS, nullable=False),
    )
    op.create_index("ix_cost_ledger_tenant_at", "cost_ledger", ["tenant_id", "at"])
    op.create_index("ix_cost_ledger_run", "cost_ledger", ["run_id"])
    op.create_index(
        "uq_cost_ledger_call", "cost_ledger", ["step_id", "attempt", "delivery", "kind", "ordinal"], unique=True
    )

    op.create_table(
        "budgets",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("target", sa.String(128), server_default="", nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("limit_usd", MONEY, nullable=True),
        sa.Column("limit_tokens", sa.BigInteger, nullable=True),
        sa.Column("enforcement", sa.String(8), nullable=False),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name"),
        sa.CheckConstraint("scope IN ('tenant', 'workflow', 'agent', 'run')", name="ck_budgets_scope"),
        sa.CheckConstraint("period IN ('run', 'day', 'month')", name="ck_budgets_period"),
        sa.CheckConstraint("enforcement IN ('soft', 'hard')", name="ck_budgets_enforcement"),
        sa.CheckConstraint("limit_usd IS NOT NULL OR limit_tokens IS NOT NULL", name="ck_budgets_limit"),
    )
    # One row per budget and window ('2026-11-21', '2026-11', or a run id): what was
    # spent and what running steps have reserved. Hard gates update it with a
    # conditional UPDATE, so concurrent reservations can never pass the limit together.
    op.create_table(
        "budget_windows",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("budget", sa.String(64), nullable=False),
        sa.Column("window", sa.String(40), nullable=False),
        sa.Column("spent_usd", MONEY, server_default="0", nullable=False),
        sa.Column("spent_tokens", sa.BigInteger, server_default="0", nullable=False),
        sa.Column("reserved_usd", MONEY, server_default="0", nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger, server_default="0", nullable=False),
        sa.Column("warned", sa.Boolean, server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "budget", "window"),
    )
    # What a dispatched step attempt holds in each budget window until its result settles it.
    op.create_table(
        "budget_reservations",
        sa.Column("step_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("budget", sa.String(64), nullable=False),
        sa.Column("window", sa.String(40), nullable=False),
        sa.Column("usd", MONEY, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("step_id", "attempt", "budget"),
    )
    op.add_column("runs", sa.Column("estimate", pg.JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "estimate")
    op.drop_table("budget_reservations")
    op.drop_table("budget_windows")
    op.drop_table("budgets")
    op.drop_table("cost_ledger")
    op.drop_table("audit_heads")
    op.drop_table("audit_queue")
    # Dropping the whole table is the one way out; rows are never rewritten in place.
    op.execute("DROP TABLE audits")
    op.execute("DROP FUNCTION agentflow_audits_forward_only()")
