"""Request and response models of REST API v1."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RunStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StepStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class WorkflowVersionOut(BaseModel):
    name: str
    version: int
    spec_hash: str
    created: bool = Field(description="False when the spec was identical to an existing version")


class WorkflowOut(BaseModel):
    name: str
    version: int
    spec_hash: str
    spec: dict[str, Any]
    versions: list[int]
    created_at: datetime


class CreateRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str = Field(min_length=1, max_length=128)
    version: int | None = Field(None, ge=1)
    input: Any = None


class CreateRunOut(BaseModel):
    id: uuid.UUID
    status: RunStatus


class DryRunOut(BaseModel):
    dry_run: Literal[True] = True
    workflow: str
    version: int
    estimate: dict[str, Any] = Field(
        description="expected path (steps), expected and worst-case tokens and dollars, and notes on assumptions"
    )


class StepOut(BaseModel):
    id: uuid.UUID
    seq: int
    state: str
    agent: str
    status: StepStatus
    attempts: int = Field(description="Times a worker picked the step up, redeliveries and retries included")
    attempt: int = Field(description="Dispatch attempt (retries after failure) currently in force")
    max_attempts: int
    worker: str | None
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    duration_ms: float | None
    step_hash: str | None
    result_hash: str | None
    output: Any = None
    error: str | None


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    #: dollars as a decimal string (exact; JSON numbers are binary floats)
    cost_usd: str


class ToolCallOut(BaseModel):
    step: uuid.UUID
    attempt: int
    tool: str
    agent: str
    outcome: str
    error: str | None
    input_hash: str | None
    output_hash: str | None
    duration_ms: float
    cost_usd: str
    started_at: datetime


class WorkerOut(BaseModel):
    id: str
    version: str
    queues: list[str]
    concurrency: int
    in_flight: int
    agent_types: list[str]
    started_at: datetime
    last_seen: datetime
    alive: bool


class RunOut(BaseModel):
    id: uuid.UUID
    workflow: str
    version: int
    status: RunStatus
    input: Any = None
    output: Any = None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: list[StepOut]
    usage: UsageOut = Field(description="Tokens and dollars the run's steps reported (every attempt counts)")
    planner_state: Any = Field(
        None, description="The planner's state: current FSM state, tree node statuses, DAG progress, the LLM plan"
    )
    estimate: dict[str, Any] | None = Field(
        None, description="The preflight cost estimate made when the run was created"
    )
    budgets: list[RunBudgetOut] = Field(
        default_factory=list, description="Budgets covering the run, with what remains in the window it spends in"
    )


class RunSummaryOut(BaseModel):
    id: uuid.UUID
    workflow: str
    version: int
    status: RunStatus
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class EnvelopeOut(BaseModel):
    step: uuid.UUID
    attempt: int
    kind: Literal["step", "result", "rejected"]
    hash: str
    raw: str = Field(description="The envelope exactly as exchanged (UTF-8)")
    envelope: Any = Field(description="The same envelope, parsed")
    created_at: datetime


class ReadyOut(BaseModel):
    ready: bool
    postgres: bool
    nats: bool


# --- governance ---------------------------------------------------------------------------


class AuditEntryOut(BaseModel):
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


class AuditPageOut(BaseModel):
    entries: list[AuditEntryOut]
    #: pass as ``after`` for the next page; null when this page was the last
    next_after: int | None


class AnchorOut(BaseModel):
    seq: int
    hash: str
    ts: str
    matches: bool | None = Field(description="null when the chain is broken before the anchor was reached")


class AuditVerifyOut(BaseModel):
    ok: bool
    length: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None
    recorded_length: int = Field(description="the chain length the database's head row records")
    anchor: AnchorOut | None = Field(None, description="the last external anchor, when one was published")
    elapsed_s: float
    pending: int = Field(0, description="entries written but not yet sealed into the chain (sealed within ~0.2 s)")


class CostGroupOut(BaseModel):
    key: str
    cost_usd: str
    prompt_tokens: int
    completion_tokens: int
    llm_calls: int
    tool_calls: int


class CostTotalOut(BaseModel):
    cost_usd: str
    prompt_tokens: int
    completion_tokens: int
    llm_calls: int
    tool_calls: int


class CostsOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    period: str
    from_: datetime = Field(alias="from")
    to: datetime
    group_by: str
    total: CostTotalOut
    groups: list[CostGroupOut]


class BudgetIn(BaseModel):
    """A budget: a limit in dollars and/or tokens on what a scope may spend per window."""

    model_config = ConfigDict(extra="forbid")

    scope: Literal["tenant", "workflow", "agent", "run"] = Field(
        description="tenant: all spend; workflow/agent: runs of that workflow / steps of that agent; run: each run"
    )
    target: str = Field("", max_length=128, description="the workflow or agent name (workflow and agent scopes)")
    period: Literal["run", "day", "month"] = Field(description="the window: each run, the UTC day or the UTC month")
    limit_usd: Decimal | None = Field(None, gt=0, le=Decimal("1e9"), decimal_places=10)
    limit_tokens: int | None = Field(None, gt=0, le=10**15)
    enforcement: Literal["soft", "hard"] = Field(
        "hard", description="hard: refuse runs and stop dispatching; soft: warn (audit entry, metric) only"
    )

    @model_validator(mode="after")
    def _consistent(self) -> BudgetIn:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ValueError("set limit_usd, limit_tokens or both")
        if self.scope in ("workflow", "agent") and not self.target:
            raise ValueError(f"target: a {self.scope} budget names its {self.scope}")
        if self.scope in ("tenant", "run") and self.target:
            raise ValueError(f"target: a {self.scope} budget has no target (got '{self.target}')")
        if self.scope == "run" and self.period != "run":
            raise ValueError("period: a run budget is per run (period 'run')")
        return self


class BudgetWindowOut(BaseModel):
    window: str
    spent_usd: str
    reserved_usd: str
    remaining_usd: str | None
    spent_tokens: int
    reserved_tokens: int
    remaining_tokens: int | None
    warned: bool = Field(description="a warning (soft) or overspend record (hard) was written for this window")


class BudgetOut(BaseModel):
    name: str
    scope: str
    target: str
    period: str
    limit_usd: str | None
    limit_tokens: int | None
    enforcement: str
    created_at: datetime
    updated_at: datetime
    current: BudgetWindowOut | None = Field(description="today's or this month's window; None for per-run budgets")


class RunBudgetOut(BudgetWindowOut):
    name: str
    scope: str
    target: str
    period: str
    enforcement: str
    limit_usd: str | None
    limit_tokens: int | None


RunOut.model_rebuild()
