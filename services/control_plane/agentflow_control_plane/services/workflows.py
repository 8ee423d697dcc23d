"""Registering and reading workflow versions."""

from __future__ import annotations

from agentflow_control_plane.db.repository import StoredVersion, TenantRepository
from agentflow_core.spec import parse_workflow


async def put_workflow(repo: TenantRepository, name: str, source: bytes) -> StoredVersion:
    """Validate and store a spec; an unchanged spec returns its existing version."""
    spec = parse_workflow(source, name=name)
    stored = await repo.put_workflow_version(name, spec.model_dump(mode="json"), spec.spec_hash())
    await repo.session.commit()
    return stored
