"""Starting and cancelling runs."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from agentflow_bus.subjects import Names
from agentflow_control_plane.db.models import Run
from agentflow_control_plane.db.repository import TenantRepository
from agentflow_control_plane.engine.decisions import from_ms, now_ms, run_finished_data
from agentflow_control_plane.engine.specs import SpecCache
from agentflow_control_plane.engine.writes import OutMsg, WriteSet, dumps_or_none
from agentflow_control_plane.governance import audit_store
from agentflow_control_plane.governance.estimates import Estimator
from agentflow_core.canonical import content_hash
from agentflow_core.errors import Conflict


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
) -> DryRun:
    """What a run would cost, without starting anything (``POST /v1/runs?dry_run=true``)."""
    content_hash(run_input)  # the same 422 as a real run for input that cannot be canonicalized
    resolved = await repo.resolve_version(workflow, version)
    key = (repo.tenant, workflow, resolved)
    compiled = (await specs.get_many(await repo.driver(), {key}))[key]
    return DryRun(workflow, resolved, estimator.estimate(compiled.spec, run_input).as_dict())


async def _existing(repo: TenantRepository, key: str, request_hash: str) -> CreatedRun | None:
    run = await repo.find_run_by_idempotency_key(key)
    if run is None:
        return None
    if run["request_hash"] != request_hash:
        raise Conflict(f"Idempotency-Key '{key}' was already used for a different request")
    return CreatedRun(run["id"], run["status"], False, [])


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
        dumps_or_none(estimator.estimate(compiled.spec, run_input).as_dict()) if estimator is not None else None,
    )
    for request in decision.dispatch:
        writes.new_step(compiled.spec, repo.tenant, run_id, request)
    if outcome is not None:
        writes.audit(repo.tenant, "run.finished", f"run:{run_id}", run_finished_data(run_id, status, outcome.error))
    # The run, its first steps, their envelopes, outbox rows and audit entries: one atomic statement.
    if not await writes.flush(conn):
        # Lost a race with a concurrent request carrying the same idempotency key.
        assert idempotency_key is not None
        existing = await _existing(repo, idempotency_key, request_hash)
        assert existing is not None
        return existing
    return CreatedRun(run_id, status, True, writes.outbox)


async def cancel_run(repo: TenantRepository, run_id: uuid.UUID, *, actor: str, governance: bool = True) -> Run:
    run, changed = await repo.cancel_run(run_id)
    if changed and governance:
        entry = audit_store.queued(repo.tenant, datetime.now(UTC), actor, "run.cancelled", f"run:{run_id}",
                                   {"run": str(run_id)})  # fmt: skip
        await audit_store.enqueue(await repo.driver(), [entry])
    await repo.session.commit()
    return run
