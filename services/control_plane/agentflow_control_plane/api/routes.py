"""REST API v1 routes. Thin: parse, call a service, shape the response."""

from __future__ import annotations

import os
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from agentflow_control_plane.api.deps import Reader, Writer
from agentflow_control_plane.api.schemas import (
    CreateRunIn,
    CreateRunOut,
    DryRunOut,
    EnvelopeOut,
    RunBudgetOut,
    RunOut,
    RunStatus,
    RunSummaryOut,
    StepOut,
    ToolCallOut,
    UsageOut,
    WorkerOut,
    WorkflowOut,
    WorkflowVersionOut,
)
from agentflow_control_plane.db.models import Run, Step, ToolCall
from agentflow_control_plane.db.repository import TenantRepository
from agentflow_control_plane.services import budgets as budget_service
from agentflow_control_plane.services import runs as run_service
from agentflow_control_plane.services import worker_registry
from agentflow_control_plane.services import workflows as workflow_service
from agentflow_core.spec import NAME_PATTERN

router = APIRouter(prefix="/v1")

WorkflowName = Annotated[str, Path(pattern=NAME_PATTERN)]


def _step_out(step: Step) -> StepOut:
    duration = None
    if step.started_at and step.finished_at:
        duration = (step.finished_at - step.started_at).total_seconds() * 1000
    return StepOut(
        id=step.id,
        seq=step.seq,
        state=step.state,
        agent=step.agent,
        status=step.status,
        attempts=step.attempts,
        attempt=step.attempt,
        max_attempts=step.max_attempts,
        worker=step.worker,
        queued_at=step.queued_at,
        started_at=step.started_at,
        finished_at=step.finished_at,
        next_attempt_at=step.next_attempt_at,
        duration_ms=duration,
        step_hash=step.step_hash,
        result_hash=step.result_hash,
        output=step.output,
        error=step.error,
    )


async def _run_out(repo: TenantRepository, run: Run) -> RunOut:
    steps = await repo.get_steps(run.id)
    prompt, completion, cost = await repo.run_usage(run.id)
    budgets = await budget_service.run_budgets(
        await repo.driver(), repo.tenant, run.id, run.workflow_name, {s.agent for s in steps}
    )
    return RunOut(
        id=run.id,
        workflow=run.workflow_name,
        version=run.workflow_version,
        status=run.status,
        input=run.input,
        output=run.output,
        error=run.error,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        steps=[_step_out(s) for s in steps],
        usage=UsageOut(prompt_tokens=prompt, completion_tokens=completion, cost_usd=f"{cost:f}"),
        estimate=run.estimate,
        budgets=[RunBudgetOut.model_validate(b) for b in budgets],
        planner_state=run.planner_state,
    )


_WORKFLOW_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


@router.put("/workflows/{name}", response_model=WorkflowVersionOut, openapi_extra=_WORKFLOW_BODY)
async def put_workflow(name: WorkflowName, request: Request, caller: Writer) -> WorkflowVersionOut:
    """Register a workflow from a YAML or JSON body. A changed spec becomes a new version."""
    stored = await workflow_service.put_workflow(
        caller.repo, name, await request.body(), caller.state.tools, actor=caller.actor,
        governance=caller.state.settings.governance_enabled,
    )  # fmt: skip
    return WorkflowVersionOut(
        name=stored.name, version=stored.version, spec_hash=stored.spec_hash, created=stored.created
    )


@router.get("/workflows/{name}", response_model=WorkflowOut)
async def get_workflow(
    name: WorkflowName, caller: Reader, version: Annotated[int | None, Query(ge=1)] = None
) -> WorkflowOut:
    repo = caller.repo
    found = await repo.get_workflow_version(name, version)
    versions = [v for v, _ in await repo.list_workflow_versions(name)]
    return WorkflowOut(
        name=found.name,
        version=found.version,
        spec_hash=found.spec_hash,
        spec=found.spec,
        versions=versions,
        created_at=found.created_at,
    )


@router.post(
    "/runs",
    status_code=201,
    response_model=CreateRunOut | DryRunOut,
    responses={200: {"model": CreateRunOut | DryRunOut}},
)
async def create_run(
    body: CreateRunIn,
    caller: Writer,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    dry_run: Annotated[bool, Query(description="only estimate what the run would cost; start nothing")] = False,
) -> Any:
    """Start a run. With an ``Idempotency-Key``, repeating the request returns the same run (200).
    With ``dry_run=true``, return the preflight cost estimate and start nothing (200)."""
    state = caller.state
    if dry_run:
        dry = await run_service.estimate_run(
            caller.repo, state.specs, state.estimator, workflow=body.workflow, version=body.version,
            run_input=body.input, costs=state.costs,
        )  # fmt: skip
        out_dry = DryRunOut(workflow=dry.workflow, version=dry.version, estimate=dry.estimate)
        return JSONResponse(out_dry.model_dump(mode="json"), status_code=200)
    dispatcher = caller.dispatcher
    created = await run_service.create_run(
        caller.repo,
        state.specs,
        state.names,
        workflow=body.workflow,
        version=body.version,
        run_input=body.input,
        idempotency_key=idempotency_key,
        actor=caller.actor,
        estimator=state.estimator,
        governance=state.settings.governance_enabled,
        costs=state.costs,
        engine=state.engine,
    )
    if state.settings.fault_inject == "exit_after_commit" and created.outgoing:
        os._exit(70)  # test hook: crash between commit and publish
    if created.outgoing:
        await dispatcher.publish(created.outgoing)
    out = CreateRunOut(id=created.id, status=created.status)
    if created.created:
        return out
    return JSONResponse(out.model_dump(mode="json"), status_code=200)


@router.get("/runs", response_model=list[RunSummaryOut])
async def list_runs(
    caller: Reader,
    status: RunStatus | None = None,
    workflow: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[RunSummaryOut]:
    runs = await caller.repo.list_runs(status=status, workflow=workflow, limit=limit)
    return [
        RunSummaryOut(
            id=r.id,
            workflow=r.workflow_name,
            version=r.workflow_version,
            status=r.status,
            error=r.error,
            created_at=r.created_at,
            finished_at=r.finished_at,
        )
        for r in runs
    ]


@router.get("/runs/{run_id}", response_model=RunOut)
async def get_run(run_id: uuid.UUID, caller: Reader) -> RunOut:
    return await _run_out(caller.repo, await caller.repo.get_run(run_id))


@router.get("/runs/{run_id}/tool-calls", response_model=list[ToolCallOut])
async def get_tool_calls(run_id: uuid.UUID, caller: Reader) -> list[ToolCallOut]:
    """Every tool call the run's steps made, in order, with its outcome and cost."""
    return [_tool_call_out(c) for c in await caller.repo.get_tool_calls(run_id)]


def _tool_call_out(c: ToolCall) -> ToolCallOut:
    return ToolCallOut(
        step=c.step_id, attempt=c.attempt, tool=c.tool, agent=c.agent, outcome=c.outcome, error=c.error,
        input_hash=c.input_hash, output_hash=c.output_hash, duration_ms=c.duration_ms,
        cost_usd=f"{c.cost_usd:f}", started_at=c.started_at,
    )  # fmt: skip


@router.get("/workers", response_model=list[WorkerOut])
async def list_workers(caller: Reader) -> list[WorkerOut]:
    """Workers that sent a heartbeat recently, with their queues and load."""
    return await worker_registry.list_workers(caller.state)


@router.get("/runs/{run_id}/envelopes", response_model=list[EnvelopeOut])
async def get_envelopes(run_id: uuid.UUID, caller: Reader) -> list[EnvelopeOut]:
    envelopes = await caller.repo.get_envelopes(run_id)
    out = []
    for e in envelopes:
        raw = bytes(e.body)
        try:
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        out.append(
            EnvelopeOut(
                step=e.step_id,
                attempt=e.attempt,
                kind=e.kind,
                hash=e.hash,
                raw=raw.decode("utf-8", errors="replace"),
                envelope=parsed,
                created_at=e.created_at,
            )
        )
    return out


@router.post("/runs/{run_id}/cancel", response_model=RunOut)
async def cancel_run(run_id: uuid.UUID, caller: Writer) -> RunOut:
    state, repo = caller.state, caller.repo
    run = await run_service.cancel_run(repo, run_id, actor=caller.actor, governance=state.settings.governance_enabled)
    if state.nc is not None and state.nc.is_connected:
        # Best effort: workers stop the run's in-flight steps; late results are ignored anyway.
        await state.nc.publish(state.names.cancel_subject, orjson.dumps({"run": str(run_id)}))
    return await _run_out(repo, run)
