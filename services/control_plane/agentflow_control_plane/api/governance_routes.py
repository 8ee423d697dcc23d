"""REST API v1: the audit chain, the cost ledger, calibration and budgets."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from agentflow_control_plane.api.deps import Reader, Writer
from agentflow_control_plane.api.schemas import AuditPageOut, AuditVerifyOut, BudgetIn, BudgetOut, CostsOut
from agentflow_control_plane.db.session import pg_transaction
from agentflow_control_plane.governance import audit_store, calibration, ledger
from agentflow_control_plane.governance.anchors import last_anchor
from agentflow_control_plane.services import budgets as budget_service
from agentflow_core.spec import NAME_PATTERN

BudgetName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64)]

router = APIRouter(prefix="/v1")

ACTION_PATTERN = r"^[a-z_]+(\.[a-z_]+|\.\*)?$"


@router.get("/audit", response_model=AuditPageOut)
async def list_audit(
    caller: Reader,
    run: uuid.UUID | None = None,
    action: Annotated[str | None, Query(pattern=ACTION_PATTERN, description="e.g. run.created, or step.*")] = None,
    actor: Annotated[str | None, Query(max_length=256)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after: Annotated[int, Query(ge=0, description="return entries with seq greater than this")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPageOut:
    """The tenant's audit entries in chain order, filtered and paginated by ``seq``."""
    f = audit_store.AuditFilter(
        run=run, action=action, actor=actor, since=since, until=until, after_seq=after, limit=limit
    )
    entries = await audit_store.list_entries(await caller.repo.driver(), caller.repo.tenant, f)
    return AuditPageOut.model_validate(
        {"entries": entries, "next_after": entries[-1]["seq"] if len(entries) == limit else None}
    )


@router.get("/audit/verify", response_model=AuditVerifyOut)
async def verify_audit(caller: Reader) -> AuditVerifyOut:
    """Recompute the tenant's whole chain and compare it with its last external anchor."""
    state, tenant = caller.state, caller.repo.tenant
    anchor = None
    if state.nc is not None and state.nc.is_connected:
        anchor = await last_anchor(state.nc.jetstream(), state.names, tenant)
    anchors = {int(anchor["seq"]): str(anchor["hash"])} if anchor else {}
    result = await audit_store.verify(await caller.repo.driver(), tenant, anchors)
    out: dict[str, Any] = result.as_dict()
    if anchor is not None:
        seq, bad = int(anchor["seq"]), result.first_bad_seq
        matches = None if bad is not None and bad < seq else (bad != seq and result.length >= seq)
        out["anchor"] = {"seq": seq, "hash": anchor["hash"], "ts": anchor["ts"], "matches": matches}
    return AuditVerifyOut.model_validate(out)


@router.get("/costs", response_model=CostsOut, response_model_by_alias=True)
async def get_costs(
    caller: Reader,
    period: ledger.Period = "today",
    group_by: ledger.GroupBy = "workflow",
    workflow: Annotated[str | None, Query(max_length=128)] = None,
    run: uuid.UUID | None = None,
) -> CostsOut:
    """What the tenant's LLM and tool calls cost in a period, grouped, from the ledger."""
    q = ledger.CostQuery(period=period, group_by=group_by, workflow=workflow, run=str(run) if run else None)
    return CostsOut.model_validate(await ledger.costs(await caller.repo.driver(), caller.repo.tenant, q))


@router.get("/costs/calibration")
async def get_calibration(
    caller: Reader,
    last: Annotated[
        int, Query(ge=1, le=1000, description="errors over this many recent estimates per agent/model")
    ] = 50,
) -> dict[str, Any]:
    """Correction factors per (agent, model) and the relative errors of recent estimates."""
    return await calibration.report(await caller.repo.driver(), caller.repo.tenant, last)


@router.get("/budgets", response_model=list[BudgetOut])
async def list_budgets(caller: Reader) -> list[dict[str, Any]]:
    """The tenant's budgets, each with its current day or month window."""
    return await budget_service.list_budgets(await caller.repo.driver(), caller.repo.tenant)


@router.get("/budgets/{name}", response_model=BudgetOut)
async def get_budget(name: BudgetName, caller: Reader) -> dict[str, Any]:
    return await budget_service.get_budget(await caller.repo.driver(), caller.repo.tenant, name)


@router.put("/budgets/{name}", response_model=BudgetOut, responses={201: {"model": BudgetOut}})
async def put_budget(name: BudgetName, body: BudgetIn, caller: Writer, response: Response) -> dict[str, Any]:
    """Create (201) or replace (200) a budget. It applies to runs created and steps dispatched
    from now on, on this control plane at once and on others within two seconds."""
    state, tenant = caller.state, caller.repo.tenant
    await caller.repo.ensure_tenant()
    async with pg_transaction(state.engine) as conn:
        stored = await budget_service.put_budget(
            conn, tenant, name, body.model_dump(), actor=caller.actor, governance=state.settings.governance_enabled
        )
    if state.costs is not None:
        state.costs.budgets.invalidate(tenant)
    response.status_code = 201 if stored.created else 200
    return stored.budget


@router.delete("/budgets/{name}", status_code=204)
async def delete_budget(name: BudgetName, caller: Writer) -> Response:
    """Delete a budget and its windows; what its reservations held is no longer counted."""
    state, tenant = caller.state, caller.repo.tenant
    async with pg_transaction(state.engine) as conn:
        await budget_service.delete_budget(
            conn, tenant, name, actor=caller.actor, governance=state.settings.governance_enabled
        )
    if state.costs is not None:
        state.costs.budgets.invalidate(tenant)
    return Response(status_code=204)
