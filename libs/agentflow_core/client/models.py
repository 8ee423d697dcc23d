"""What the REST API returns, as pydantic models.

Written from the API's responses, not imported from the server, so the SDK installs
and imports without it. Every model keeps fields it does not know (``extra="allow"``):
a newer server adding a field never breaks an older client, and the field is still
readable as an attribute. Statuses are plain strings for the same reason; compare them
with the constants below. Dollar amounts the API sends as exact decimal strings are
:class:`~decimal.Decimal` here.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: run statuses after which nothing changes any more
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: event types that end a run's event stream
TERMINAL_EVENTS = frozenset({"run.succeeded", "run.failed", "run.cancelled"})


class APIModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- workflows ----------------------------------------------------------------------------


class WorkflowVersion(APIModel):
    """``PUT /v1/workflows/{name}``: the version the spec was stored as."""

    name: str
    version: int
    spec_hash: str
    #: False when the spec was identical to an existing version (nothing new was stored)
    created: bool


class Workflow(APIModel):
    """``GET /v1/workflows/{name}``: one version with its spec and every version number."""

    name: str
    version: int
    spec_hash: str
    spec: dict[str, Any]
    versions: list[int]
    created_at: datetime


# --- runs -----------------------------------------------------------------------------------


class CreatedRun(APIModel):
    """``POST /v1/runs``."""

    id: uuid.UUID
    status: str
    #: False when an ``Idempotency-Key`` matched an earlier request and its run was returned (HTTP 200)
    created: bool = True


class StepEstimate(APIModel):
    node: str | None = None
    agent: str | None = None
    agent_type: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    cost_usd: float = 0.0
    max_cost_usd: float | None = None
    max_tokens_total: int | None = None
    attempts: int | None = None
    price_known: bool | None = None
    notes: list[str] = Field(default_factory=list)


class Estimate(APIModel):
    """The preflight cost estimate of a run: its expected path and the worst case."""

    planner: str | None = None
    expected_cost_usd: float = 0.0
    expected_tokens: int = 0
    expected_steps: int = 0
    worst_cost_usd: float | None = None
    worst_tokens: int | None = None
    worst_steps: int | None = None
    #: False when loops without a guard make the worst case unbounded
    bounded: bool | None = None
    steps: list[StepEstimate] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class DryRun(APIModel):
    """``POST /v1/runs?dry_run=true``: what a run would cost; nothing was started."""

    dry_run: bool = True
    workflow: str
    version: int
    estimate: Estimate


class Step(APIModel):
    id: uuid.UUID
    seq: int
    state: str
    agent: str
    status: str
    #: times a worker picked the step up, redeliveries and retries included
    attempts: int
    #: the dispatch attempt (retries after failure) currently in force
    attempt: int
    max_attempts: int
    worker: str | None = None
    queued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_attempt_at: datetime | None = None
    duration_ms: float | None = None
    step_hash: str | None = None
    result_hash: str | None = None
    output: Any = None
    error: str | None = None


class Usage(APIModel):
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal


class BudgetWindow(APIModel):
    window: str
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal | None = None
    spent_tokens: int
    reserved_tokens: int
    remaining_tokens: int | None = None
    #: a warning (soft) or overspend record (hard) was written for this window
    warned: bool


class RunBudget(BudgetWindow):
    """A budget covering a run, with what remains in the window the run spends in."""

    name: str
    scope: str
    target: str
    period: str
    enforcement: str
    limit_usd: Decimal | None = None
    limit_tokens: int | None = None


class Run(APIModel):
    """``GET /v1/runs/{id}``: a run with its steps, usage, estimate and budgets."""

    id: uuid.UUID
    workflow: str
    version: int
    status: str
    input: Any = None
    output: Any = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    steps: list[Step] = Field(default_factory=list)
    usage: Usage | None = None
    #: the planner's state: current FSM state, tree node statuses, DAG progress, the LLM plan
    planner_state: Any = None
    estimate: Estimate | None = None
    budgets: list[RunBudget] = Field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class RunSummary(APIModel):
    """An item of ``GET /v1/runs``."""

    id: uuid.UUID
    workflow: str
    version: int
    status: str
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None = None


class ToolCall(APIModel):
    step: uuid.UUID
    attempt: int
    tool: str
    agent: str
    #: ok, denied, invalid_input, rate_limited, budget_exceeded, error, timeout, invalid_output
    outcome: str
    error: str | None = None
    input_hash: str | None = None
    output_hash: str | None = None
    duration_ms: float
    cost_usd: Decimal
    started_at: datetime


class Envelope(APIModel):
    step: uuid.UUID
    attempt: int
    #: step, result or rejected (a result that failed verification, kept as evidence)
    kind: str
    hash: str
    #: the envelope exactly as exchanged (UTF-8): hash this, not a re-serialization
    raw: str
    envelope: Any = None
    created_at: datetime


# --- events ---------------------------------------------------------------------------------


class Event(APIModel):
    """One event of a run or tenant stream; ``cursor`` orders them and resumes a stream."""

    cursor: int
    type: str
    ts: datetime
    run_id: uuid.UUID | None = None
    workflow: str | None = None
    step_id: uuid.UUID | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """True for the event that ends a run (run.succeeded, run.failed, run.cancelled)."""
        return self.type in TERMINAL_EVENTS


class EventPage(APIModel):
    """A page of stored events (``GET .../events`` as JSON); pass ``next_cursor`` as ``after``."""

    events: list[Event]
    next_cursor: int


class EventTicket(APIModel):
    """``POST /v1/events/tickets``: a short-lived ``?ticket=`` for clients that cannot send headers (browsers)."""

    ticket: str
    expires_at: datetime


# --- workers and health ---------------------------------------------------------------------


class Worker(APIModel):
    id: str
    version: str
    queues: list[str]
    concurrency: int
    in_flight: int
    agent_types: list[str]
    started_at: datetime
    last_seen: datetime
    alive: bool


class Ready(APIModel):
    """``GET /readyz``: whether the control plane reaches Postgres and NATS."""

    ready: bool
    postgres: bool
    nats: bool


# --- governance -----------------------------------------------------------------------------


class AuditEntry(APIModel):
    """One chain entry: ``hash`` is sha256 over the JCS form of all the other members."""

    tenant: str
    seq: int
    ts: str
    actor: str
    action: str
    resource: str
    data: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(APIModel):
    entries: list[AuditEntry]
    #: pass as ``after`` for the next page; None when this page was the last
    next_after: int | None = None


class Anchor(APIModel):
    seq: int
    hash: str
    ts: str
    #: None when the chain is broken before the anchor was reached
    matches: bool | None = None


class AuditVerification(APIModel):
    """``GET /v1/audit/verify``: the whole chain recomputed and compared with its last anchor."""

    ok: bool
    length: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None
    recorded_length: int
    anchor: Anchor | None = None
    elapsed_s: float
    #: entries written but not yet sealed into the chain (sealed within ~0.2 s)
    pending: int = 0


class CostTotal(APIModel):
    cost_usd: Decimal
    prompt_tokens: int
    completion_tokens: int
    llm_calls: int
    tool_calls: int


class CostGroup(CostTotal):
    key: str


class Costs(APIModel):
    """``GET /v1/costs``: spend in a period from the cost ledger, grouped."""

    period: str
    from_: datetime = Field(alias="from")
    to: datetime
    group_by: str
    total: CostTotal
    groups: list[CostGroup]


class ErrorStats(APIModel):
    """Relative errors ``|estimate - actual| / actual``; None without data."""

    count: int = 0
    p50: float | None = None
    p95: float | None = None
    mean: float | None = None


class CalibrationGroup(APIModel):
    agent: str
    model: str
    samples: int
    prompt_factor: float
    completion_factor: float
    cost_error: ErrorStats
    token_error: ErrorStats
    uncorrected_token_error: ErrorStats


class Calibration(APIModel):
    """``GET /v1/costs/calibration``: learnt correction factors and estimate errors."""

    window: int
    last: int
    cost_error: ErrorStats
    token_error: ErrorStats
    groups: list[CalibrationGroup]


class Budget(APIModel):
    name: str
    scope: str
    target: str
    period: str
    limit_usd: Decimal | None = None
    limit_tokens: int | None = None
    enforcement: str
    created_at: datetime
    updated_at: datetime
    #: today's or this month's window; None for per-run budgets
    current: BudgetWindow | None = None


__all__ = [
    "TERMINAL_EVENTS",
    "TERMINAL_STATUSES",
    "APIModel",
    "Anchor",
    "AuditEntry",
    "AuditPage",
    "AuditVerification",
    "Budget",
    "BudgetWindow",
    "Calibration",
    "CalibrationGroup",
    "CostGroup",
    "CostTotal",
    "Costs",
    "CreatedRun",
    "DryRun",
    "Envelope",
    "ErrorStats",
    "Estimate",
    "Event",
    "EventPage",
    "EventTicket",
    "Ready",
    "Run",
    "RunBudget",
    "RunSummary",
    "Step",
    "StepEstimate",
    "ToolCall",
    "Usage",
    "Worker",
    "Workflow",
    "WorkflowVersion",
]
