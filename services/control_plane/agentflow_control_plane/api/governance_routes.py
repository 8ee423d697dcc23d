"""REST API v1: the audit chain and the cost ledger."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from agentflow_control_plane.api.deps import Reader
from agentflow_control_plane.api.schemas import AuditPageOut, AuditVerifyOut, CostsOut
from agentflow_control_plane.governance import audit_store, ledger
from agentflow_control_plane.governance.anchors import last_anchor

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
