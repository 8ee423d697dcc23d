"""Run events (the resumable event stream), event-stream tickets, the run's trace context.

Engine transactions queue events in ``event_queue`` in the same statement as the change
they describe. A sequencer moves them to ``events`` and numbers them (``cursor``) in the
order it moves them, one sequencer at a time: so a reader that has seen cursor N never
later finds a new event below N, which is what lets clients resume with ``after=N``
without a gap or a duplicate, across control-plane restarts. ``events`` has no foreign
key to ``runs`` on purpose: it is written at engine speed, and the check would cost
every insert.

``event_tickets`` holds single-use, short-lived tickets for browsers, which cannot set
an Authorization header on a WebSocket or EventSource (only a hash is stored).

``runs.traceparent`` is the W3C trace context of the span that created the run, so the
run's later decisions, dispatches and steps join the request's trace.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def _event_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("workflow", sa.String(128), nullable=True),
        sa.Column("step_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("type", sa.String(48), nullable=False),
        sa.Column("data", pg.JSONB, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    ]


def upgrade() -> None:
    op.create_table("event_queue", sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True), *_event_columns())
    op.create_table("events", sa.Column("cursor", sa.BigInteger, primary_key=True, autoincrement=False),
                    *_event_columns())  # fmt: skip
    op.create_index("ix_events_run", "events", ["tenant_id", "run_id", "cursor"])
    op.create_index("ix_events_tenant", "events", ["tenant_id", "cursor"])
    op.create_index("ix_events_created", "events", ["created_at"])
    # The last cursor handed out, and the highest one retention has deleted: a client
    # resuming below ``pruned`` missed events that are gone, and is told so (410).
    op.create_table(
        "event_cursor",
        sa.Column("id", sa.SmallInteger, primary_key=True),
        sa.Column("last", sa.BigInteger, nullable=False),
        sa.Column("pruned", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name="event_cursor_one_row"),
    )
    op.execute("INSERT INTO event_cursor (id, last, pruned) VALUES (1, 0, 0)")
    op.create_table(
        "event_tickets",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("roles", pg.ARRAY(sa.String(32)), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_event_tickets_expires", "event_tickets", ["expires_at"])
    op.add_column("runs", sa.Column("traceparent", sa.String(55), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "traceparent")
    op.drop_table("event_tickets")
    op.drop_table("event_cursor")
    op.drop_table("events")
    op.drop_table("event_queue")
