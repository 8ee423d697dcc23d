"""Applying a planner's decision to the rows of one engine transaction.

Shared by run creation, the result path and the planner timer loop, so a decision means
the same thing whatever event produced it: new steps go to the outbox, halted steps are
cancelled (and their workers told), the run's timer is replaced, and a finished run
stops everything it still has in flight.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from nats.aio.client import Client

from agentflow_bus.subjects import Names
from agentflow_control_plane import metrics
from agentflow_control_plane.engine.rows import ACTIVE, RunRow, StepRow
from agentflow_control_plane.engine.writes import WriteSet, clean_text, step_id_for
from agentflow_control_plane.governance.budgets import Refusal
from agentflow_control_plane.tracing import traced_decision
from agentflow_core.planners import Decision
from agentflow_core.planners.progress import transition
from agentflow_core.spec import WorkflowSpec

log = logging.getLogger("agentflow.decisions")


def now_ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


def from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _halt(row: StepRow, run: RunRow, writes: WriteSet, now: datetime) -> None:
    row.status = "cancelled"
    row.finished_at = now
    row.next_attempt_at = None
    row.dirty = True
    writes.event(row.tenant, run.id, run.key[1], "step.cancelled",
                 {"name": row.state, "agent": row.agent, "attempt": row.attempt}, row.id)  # fmt: skip


@traced_decision
def apply_decision(
    decision: Decision,
    *,
    run: RunRow,
    spec: WorkflowSpec,
    tenant: str,
    writes: WriteSet,
    now: datetime,
    loaded: Mapping[uuid.UUID, Sequence[StepRow]],
) -> None:
    """Record ``decision`` for ``run``. ``loaded`` holds the run's step rows already in
    memory (by run id): those are changed in place, the others by the write set."""
    if decision.ignored:
        return
    moved = transition(run.state, decision.state)
    if moved is not None:
        writes.event(tenant, run.id, run.key[1], "planner.transition", moved)
    run.state = decision.state
    run.dirty = True
    run.wake_at = from_ms(decision.wake_at_ms)
    halted = set(decision.cancel)
    # dispatched and halted within one decision: never sent
    requests = [r for r in decision.dispatch if r.seq not in halted]
    refusal = writes.admit_steps(spec, tenant, run.id, run.key[1], requests)
    if refusal is not None:
        stop_for_budget(run, refusal, tenant=tenant, writes=writes, now=now, loaded=loaded)
        return
    for request in requests:
        writes.new_step(spec, tenant, run.id, request, trace=run.traceparent)
    in_memory = {row.seq: row for row in loaded.get(run.id, ())}
    cancelled: list[str] = []
    for seq in sorted(halted):
        row = in_memory.get(seq)
        if row is not None:
            if row.status in ACTIVE:
                _halt(row, run, writes, now)
        else:
            writes.cancel_steps.append(step_id_for(run.id, seq))
        cancelled.append(str(step_id_for(run.id, seq)))
    outcome = decision.outcome
    if outcome is not None:
        run.status = outcome.status
        run.output = outcome.output
        run.error = outcome.error
        run.finished_at = now
        run.wake_at = None
        # Planners name every step still in flight in ``cancel`` when they end a run;
        # rows of this batch are checked too, at no cost (no extra statement per run).
        for row in in_memory.values():
            if row.status in ACTIVE:
                _halt(row, run, writes, now)
                cancelled.append(str(row.id))
    if cancelled:
        writes.cancel_notices.append({"run": str(run.id), "steps": sorted(set(cancelled))})
    if outcome is None:
        return
    _finished(run, tenant, writes)


def _finished(run: RunRow, tenant: str, writes: WriteSet) -> None:
    if writes.budgets is not None:
        writes.budgets.release_run(run.id)
    writes.event(tenant, run.id, run.key[1], f"run.{run.status}", run_final_event(run.status, run.output, run.error))
    writes.audit(tenant, "run.finished", f"run:{run.id}", run_finished_data(run.id, run.status, run.error))
    metrics.RUNS_FINISHED.labels(run.status).inc()


def stop_for_budget(
    run: RunRow,
    refusal: Refusal,
    *,
    tenant: str,
    writes: WriteSet,
    now: datetime,
    loaded: Mapping[uuid.UUID, Sequence[StepRow]],
) -> None:
    """A hard budget cannot take the run's next dispatch: dispatch nothing, stop the
    steps still in flight (like a planner ending the run), end the run ``failed``."""
    run.status = "failed"
    run.error = f"budget_exceeded: {refusal.message()}"
    run.output = None
    run.finished_at = now
    run.wake_at = None
    run.dirty = True
    for row in loaded.get(run.id, ()):
        if row.status in ACTIVE:
            _halt(row, run, writes, now)
    writes.halt_runs.append(run.id)
    writes.cancel_notices.append({"run": str(run.id)})
    metrics.BUDGET_EVENTS.labels(tenant, "stopped").inc()
    writes.audit(tenant, "budget.exceeded", f"budget:{refusal.budget.name}",
                 {"run": str(run.id), **refusal.as_dict()})  # fmt: skip
    writes.event(tenant, run.id, run.key[1], "budget.exceeded", refusal.as_dict())
    _finished(run, tenant, writes)


#: outputs larger than this (as JSON) are left out of run.succeeded; GET the run for them
EVENT_OUTPUT_LIMIT = 16_384


def run_final_event(status: str, output: Any, error: str | None) -> dict[str, Any]:
    """The data of a run's terminal event (run.succeeded / run.failed / run.cancelled)."""
    data: dict[str, Any] = {"status": status}
    if error:
        data["error"] = clean_text(error, 2000)
    if output is not None:
        if len(orjson.dumps(output)) <= EVENT_OUTPUT_LIMIT:
            data["output"] = output
        else:
            data["output_truncated"] = True
    return data


def run_finished_data(run_id: uuid.UUID, status: str, error: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"run": str(run_id), "status": status}
    if error:
        data["error"] = clean_text(error, 300)
    return data


async def publish_cancels(nc: Client, names: Names, notices: list[dict[str, Any]]) -> None:
    """Tell workers to stop halted steps (best effort: a late result is ignored anyway)."""
    for notice in notices:
        try:
            await nc.publish(names.cancel_subject, orjson.dumps(notice))
        except Exception as exc:  # NATS down: the steps' results will be recorded and ignored
            log.warning("could not publish a cancel notice (%s)", exc)
