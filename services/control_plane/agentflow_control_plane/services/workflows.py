"""Registering and reading workflow versions."""

from __future__ import annotations

from agentflow_control_plane.db.repository import StoredVersion, TenantRepository
from agentflow_core.spec import parse_workflow
from agentflow_core.tools_config import ToolsConfig


async def put_workflow(repo: TenantRepository, name: str, source: bytes, tools: ToolsConfig) -> StoredVersion:
    """Validate and store a spec; an unchanged spec returns its existing version."""
    spec = parse_workflow(source, name=name, tools=tools)
    stored = await repo.put_workflow_version(name, spec.model_dump(mode="json"), spec.spec_hash())
    await repo.session.commit()
    return stored
