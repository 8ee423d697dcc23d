"""Starting and cancelling runs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.subjects import Names
from agentflow_control_plane import metrics
from agentflow_control_plane.db.models import Run
from agentflow_control_plane.db.repository import TenantRepository
from agentflow_control_plane.db.session import pg_transaction
from agentflow_control_plane.engine.decisions import from_ms, now_ms, run_final_event, run_finished_data
from agentflow_control_plane.engine.specs import SpecCache
from agentflow_control_plane.engine.writes import OutMsg, WriteSet, dumps_or_none
from agentflow_control_plane.governance import audit_store
from agentflow_control_plane.governance.budgets import BudgetBook, Refusal, admission_refusal
from agentflow_control_plane.governance.calibration import Corrections
from agentflow_control_plane.governance.costing import CostServices
from agentflow_control_plane.governance.estimates import Costing, Estimator
from agentflow_control_plane.tracing import run_traceparent, traced_create
from agentflow_core.canonical import content_hash
from agentflow_core.errors import BudgetExceeded, Conflict
from agentflow_core.planners import StepRequest
from agentflow_core.planners.progress import transition
from agentflow_core.spec import WorkflowSpec


@dataclass(frozen=True, slots=True)
class CreatedRun:
    id: uuid.UUID
    status: str
    created: bool
    outgoing: list[OutMsg]


@dataclass(frozen=True, slots=True)
class DryRun:
    workflow: str
    version: int
    estimate: dict[str, Any]


async def estimate_run(
    repo: TenantRepository,
    specs: SpecCache,
    estimator: Estimator,
    *,
    workflow: str,
    version: int | None,
    run_input: Any,
    costs: CostServices | None = None,
) -> DryRun:
    """What a run would cost, without starting anything (``POST /v1/runs?dry_run=true``)."""
    content_hash(run_input)  # the same 422 as a real run for input that cannot be canonicalized
    resolved = await repo.resolve_version(workflow, version)
    key = (repo.tenant, workflow, resolved)
    conn = await repo.driver()
    compiled = (await specs.get_many(conn, {key}))[key]
    corrections = await _corrections(conn, costs, repo.tenant, estimator, compiled.spec)
    return DryRun(workflow, resolved, estimator.estimate(compiled.spec, run_input, corrections).as_dict())


async def _corrections(
    conn: asyncpg.Connection, costs: CostServices | None, tenant: str, estimator: Estimator, spec: WorkflowSpec
) -> Corrections | None:
    if costs is None or not estimator.needs_costing(spec):
        return None
    return await costs.calibration.get(conn, tenant)


async def _existing(repo: TenantRepository, key: str, request_hash: str) -> CreatedRun | None:
    run = await repo.find_run_by_idempotency_key(key)
    if run is None:
        return None
    if run["request_hash"] != request_hash:
        raise Conflict(f"Idempotency-Key '{key}' was already used for a different request")
    return CreatedRun(run["id"], run["status"], False, [])


@traced_create
async def create_run(
    repo: TenantRepository,
    specs: SpecCache,
    names: Names,
    *,
    workflow: str,
    version: int | None,
    run_input: Any,
    idempotency_key: str | None,
    actor: str,
    estimator: Estimator | None = None,
    governance: bool = True,
    costs: CostServices | None = None,
    engine: AsyncEngine | None = None,
) -> CreatedRun:
    # Raises CanonicalizationError (422) for NaN, Infinity, |int| >= 2**53 before anything is stored.
    request_hash = content_hash({"workflow": workflow, "version": version, "input": run_input})
    if idempotency_key:
        existing = await _existing(repo, idempotency_key, request_hash)
        if existing is not None:
            return existing
    await repo.ensure_tenant()
    resolved = await repo.resolve_version(workflow, version)
    key = (repo.tenant, workflow, resolved)
    conn = await repo.driver()
    compiled = (await specs.get_many(conn, {key}))[key]
    run_id = uuid.UUID(bytes=os.urandom(16), version=4)
    now = datetime.now(UTC)
    decision = compiled.planner.start(run_input, now_ms(now))
    outcome = decision.outcome
    status = outcome.status if outcome else "pending"
    writes = WriteSet(names, now, governance=governance)
    estimate = None
    if estimator is not None:
        corrections = await _corrections(conn, costs, repo.tenant, estimator, compiled.spec)
        estimate = estimator.estimate(compiled.spec, run_input, corrections).as_dict()
        if costs is not None:
            writes.costing = Costing(estimator, {repo.tenant: corrections} if corrections else {})
    writes.audit(
        repo.tenant, "run.created", f"run:{run_id}",
        {"run": str(run_id), "workflow": workflow, "version": resolved, "request_hash": request_hash,
         "idempotency_key": idempotency_key},
        actor=actor,
    )  # fmt: skip
    writes.new_run = (
        run_id,
        repo.tenant,
        workflow,
        resolved,
        status,
        dumps_or_none(run_input),
        dumps_or_none(outcome.output if outcome else None),
        outcome.error if outcome else None,
        orjson.dumps(decision.state).decode(),
        idempotency_key,
        request_hash,
        now,
        now if outcome else None,
        None if outcome else from_ms(decision.wake_at_ms),
        dumps_or_none(estimate),
        run_traceparent(run_id),
    )
    writes.event(repo.tenant, run_id, workflow, "run.created", {"workflow": workflow, "version": resolved,
                                                                "status": status})  # fmt: skip
    moved = transition(None, decision.state)
    if moved is not None:
        writes.event(repo.tenant, run_id, workflow, "planner.transition", moved)
    if outcome is not None:
        writes.audit(repo.tenant, "run.finished", f"run:{run_id}", run_finished_data(run_id, status, outcome.error))
        writes.event(repo.tenant, run_id, workflow, f"run.{status}",
                     run_final_event(status, outcome.output, outcome.error))  # fmt: skip
    budgets = (await costs.budgets.get_many(conn, [repo.tenant]))[repo.tenant] if costs is not None else ()
    if budgets and engine is not None:
        # The windows stay locked from the admission check to the commit of the run and
        # its first reservations.
        async with pg_transaction(engine) as tx:
            book = await BudgetBook.open(tx, costs.budgets, [(repo.tenant, run_id)], now)  # type: ignore[union-attr]
            refusal = _admit(writes, book, compiled.spec, repo.tenant, run_id, workflow, estimate, decision.dispatch)
            if refusal is None:
                inserted = await writes.flush(tx)
        if refusal is not None:
            await _refused(conn, repo.tenant, actor, workflow, refusal, estimate, governance)
    else:
        writes.admit_steps(compiled.spec, repo.tenant, run_id, workflow, decision.dispatch)
        for request in decision.dispatch:
            writes.new_step(compiled.spec, repo.tenant, run_id, request)
        # The run, its first steps, their envelopes, outbox rows and audit entries: one atomic statement.
        inserted = await writes.flush(conn)
    if not inserted:
        # Lost a race with a concurrent request carrying the same idempotency key.
        assert idempotency_key is not None
        existing = await _existing(repo, idempotency_key, request_hash)
        assert existing is not None
        return existing
    return CreatedRun(run_id, status, True, writes.outbox)


def _admit(
    writes: WriteSet,
    book: BudgetBook | None,
    spec: WorkflowSpec,
    tenant: str,
    run_id: uuid.UUID,
    workflow: str,
    estimate: dict[str, Any] | None,
    dispatch: Sequence[StepRequest],
) -> Refusal | None:
    """Hard budgets against the run's expected cost, then its first steps' reservations."""
    writes.attach_budgets(book)
    if book is not None and estimate is not None:
        hard, soft = admission_refusal(book, tenant=tenant, run_id=run_id, workflow=workflow, estimate=estimate)
        if hard is not None:
            return hard
        for warning in soft:
            metrics.BUDGET_EVENTS.labels(tenant, "warning").inc()
            writes.audit(tenant, "budget.warning", f"budget:{warning.budget.name}",
                         {"run": str(run_id), "reason": "estimate", **warning.as_dict()})  # fmt: skip
    refusal = writes.admit_steps(spec, tenant, run_id, workflow, dispatch)
    if refusal is not None:
        return refusal
    for request in dispatch:
        writes.new_step(spec, tenant, run_id, request)
    return None


async def _refused(
    conn: asyncpg.Connection,
    tenant: str,
    actor: str,
    workflow: str,
    refusal: Refusal,
    estimate: dict[str, Any] | None,
    governance: bool,
) -> None:
    metrics.BUDGET_EVENTS.labels(tenant, "refused").inc()
    details = {**refusal.as_dict(), "workflow": workflow}
    if estimate is not None:
        details |= {"expected_cost_usd": estimate["expected_cost_usd"], "worst_cost_usd": estimate["worst_cost_usd"]}
    if governance:
        entry = audit_store.queued(tenant, datetime.now(UTC), actor, "budget.refused", f"budget:{refusal.budget.name}",
                                   details)  # fmt: skip
        await audit_store.enqueue(conn, [entry])
    raise BudgetExceeded(f"run refused: {refusal.message()}", details=details)


async def cancel_run(repo: TenantRepository, run_id: uuid.UUID, *, actor: str, governance: bool = True) -> Run:
    run, halted = await repo.cancel_run(run_id)
    if halted is not None:
        now = datetime.now(UTC)
        writes = WriteSet(Names(""), now, governance=governance)  # events and audit only: nothing to publish
        for step_id, name, agent, attempt in halted:
            writes.event(repo.tenant, run_id, run.workflow_name, "step.cancelled",
                         {"name": name, "agent": agent, "attempt": attempt}, step_id)  # fmt: skip
        writes.event(repo.tenant, run_id, run.workflow_name, "run.cancelled",
                     {**run_final_event("cancelled", None, run.error), "by": actor})  # fmt: skip
        writes.audit(repo.tenant, "run.cancelled", f"run:{run_id}", {"run": str(run_id)}, actor=actor)
        await writes.flush(await repo.driver())
    await repo.session.commit()
    return run
