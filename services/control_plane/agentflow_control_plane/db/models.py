"""SQLAlchemy 2.0 typed ORM models. Alembic migrations in ``migrations/`` own the schema.

Every table carries ``tenant_id``; repositories (``db/repository.py``) add the tenant
filter to every query, so routes never filter by tenant themselves.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Workflow(Base):
    __tablename__ = "workflows"

    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WorkflowVersion(Base):
    """An immutable version of a workflow spec, identified by its content hash."""

    __tablename__ = "workflow_versions"
    __table_args__ = (Index("uq_workflow_versions_hash", "tenant_id", "name", "spec_hash", unique=True),)

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec_hash: Mapped[str] = mapped_column(String(80))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index(
            "uq_runs_idempotency",
            "tenant_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("ix_runs_tenant_created", "tenant_id", "created_at"),
        Index("ix_runs_wake_at", "wake_at", postgresql_where=text("wake_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    workflow_name: Mapped[str] = mapped_column(String(128))
    workflow_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    input: Mapped[Any] = mapped_column(JSONB, nullable=True)
    output: Mapped[Any] = mapped_column(JSONB, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    planner_state: Mapped[dict[str, Any]] = mapped_column(JSONB)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: when the planner wants its next timer tick (BT timeouts/retries, re-runs)
    wake_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: the preflight cost estimate made at creation
    estimate: Mapped[Any] = mapped_column(JSONB, nullable=True)
    #: W3C trace context of the span that created the run; its later spans join that trace
    traceparent: Mapped[str | None] = mapped_column(String(55))


class Step(Base):
    """One planned step of a run. ``attempt`` counts dispatches (retries after failure);
    ``attempts`` counts worker pickups across all dispatches (redeliveries included)."""

    __tablename__ = "steps"
    __table_args__ = (
        Index("uq_steps_run_seq", "run_id", "seq", unique=True),
        Index(
            "ix_steps_retry_due",
            "next_attempt_at",
            postgresql_where=text("next_attempt_at IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(128))
    agent: Mapped[str] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    pickups_before: Mapped[int] = mapped_column(Integer, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(255))
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    output: Mapped[Any] = mapped_column(JSONB, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    step_hash: Mapped[str | None] = mapped_column(String(80))
    result_hash: Mapped[str | None] = mapped_column(String(80))


class Envelope(Base):
    """Envelopes exactly as exchanged (bytes), with their hashes, in arrival order."""

    __tablename__ = "envelopes"
    __table_args__ = (
        Index(
            "uq_envelopes_step_attempt_kind",
            "step_id",
            "attempt",
            "kind",
            unique=True,
            postgresql_where=text("kind IN ('step', 'result')"),
        ),
        Index("ix_envelopes_run", "run_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE"))
    step_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    attempt: Mapped[int] = mapped_column(Integer)
    #: step | result | rejected (a result that failed verification, kept as evidence)
    kind: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(80))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StepUsage(Base):
    """Tokens and dollars one delivery of a step reported (from its result envelope)."""

    __tablename__ = "step_usage"
    __table_args__ = (PrimaryKeyConstraint("step_id", "attempt", "delivery"), Index("ix_step_usage_run", "run_id"))

    tenant_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE"))
    step_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    attempt: Mapped[int] = mapped_column(Integer)
    delivery: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(255))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_usd: Mapped[Any] = mapped_column(Numeric(20, 10))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ToolCall(Base):
    """One tool call, as the worker's tool runtime recorded it."""

    __tablename__ = "tool_calls"
    __table_args__ = (
        Index("ix_tool_calls_run", "run_id", "id"),
        Index("uq_tool_calls_call", "step_id", "attempt", "delivery", "ordinal", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE"))
    step_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    attempt: Mapped[int] = mapped_column(Integer)
    delivery: Mapped[int] = mapped_column(Integer)
    ordinal: Mapped[int] = mapped_column(Integer)
    tool: Mapped[str] = mapped_column(String(256))
    agent: Mapped[str] = mapped_column(String(128))
    input_hash: Mapped[str | None] = mapped_column(String(80))
    output_hash: Mapped[str | None] = mapped_column(String(80))
    duration_ms: Mapped[float] = mapped_column(Float)
    cost_usd: Mapped[Any] = mapped_column(Numeric(20, 10))
    outcome: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Outbox(Base):
    """Step messages committed with their decision, waiting to be published."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_created", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    subject: Mapped[str] = mapped_column(String(255))
    msg_id: Mapped[str] = mapped_column(String(128))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    traceparent: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class _EventColumns:
    """What an event says; queued and numbered events share it."""

    tenant_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    workflow: Mapped[str | None] = mapped_column(String(128))
    step_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    type: Mapped[str] = mapped_column(String(48))
    data: Mapped[Any] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class EventQueue(_EventColumns, Base):
    """Events committed with the change they describe, waiting for the sequencer."""

    __tablename__ = "event_queue"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)


class Event(_EventColumns, Base):
    """A run event with its stream cursor (assigned in commit order by the sequencer)."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_run", "tenant_id", "run_id", "cursor"),
        Index("ix_events_tenant", "tenant_id", "cursor"),
        Index("ix_events_created", "created_at"),
    )

    cursor: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class EventTicket(Base):
    """A single-use ticket for an event stream (only its SHA-256 is stored)."""

    __tablename__ = "event_tickets"
    __table_args__ = (Index("ix_event_tickets_expires", "expires_at"),)

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    roles: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
