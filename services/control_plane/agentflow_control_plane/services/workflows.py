"""Registering and reading workflow versions."""

from __future__ import annotations

from datetime import UTC, datetime

from agentflow_control_plane.db.repository import StoredVersion, TenantRepository
from agentflow_control_plane.governance import audit_store
from agentflow_core.spec import parse_workflow
from agentflow_core.tools_config import ToolsConfig


async def put_workflow(
    repo: TenantRepository, name: str, source: bytes, tools: ToolsConfig, *, actor: str, governance: bool = True
) -> StoredVersion:
    """Validate and store a spec; an unchanged spec returns its existing version."""
    spec = parse_workflow(source, name=name, tools=tools)
    stored = await repo.put_workflow_version(name, spec.model_dump(mode="json"), spec.spec_hash())
    if stored.created and governance:
        entry = audit_store.queued(
            repo.tenant, datetime.now(UTC), actor, "workflow.created" if stored.version == 1 else "workflow.updated",
            f"workflow:{name}", {"workflow": name, "version": stored.version, "spec_hash": stored.spec_hash},
        )  # fmt: skip
        await audit_store.enqueue(await repo.driver(), [entry])
    await repo.session.commit()
    return stored
