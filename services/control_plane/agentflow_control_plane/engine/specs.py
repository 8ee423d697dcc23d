"""Process-wide cache of workflow versions and their planners.

Workflow versions are immutable, so a (tenant, name, version) entry never goes stale.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from agentflow_core.planners import Planner, planner_for
from agentflow_core.spec import WorkflowSpec

SpecKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class CompiledWorkflow:
    spec: WorkflowSpec
    planner: Planner
    spec_hash: str


class SpecCache:
    def __init__(self, capacity: int = 4096) -> None:
        self._items: OrderedDict[SpecKey, CompiledWorkflow] = OrderedDict()
        self._capacity = capacity

    def put(self, key: SpecKey, spec: WorkflowSpec, spec_hash: str) -> CompiledWorkflow:
        compiled = CompiledWorkflow(spec, planner_for(spec), spec_hash)
        self._items[key] = compiled
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return compiled

    def put_raw(self, key: SpecKey, raw: dict[str, Any], spec_hash: str) -> CompiledWorkflow:
        return self.put(key, WorkflowSpec.model_validate(raw), spec_hash)

    async def get_many(self, conn: AsyncConnection, keys: set[SpecKey]) -> dict[SpecKey, CompiledWorkflow]:
        found: dict[SpecKey, CompiledWorkflow] = {}
        missing: list[SpecKey] = []
        for key in keys:
            item = self._items.get(key)
            if item is None:
                missing.append(key)
            else:
                found[key] = item
        if missing:
            rows = await conn.execute(
                text(
                    "SELECT tenant_id, name, version, spec, spec_hash FROM workflow_versions "
                    "WHERE (tenant_id, name, version) IN "
                    "(SELECT * FROM unnest(CAST(:t AS text[]), CAST(:n AS text[]), CAST(:v AS int[])))"
                ),
                {"t": [k[0] for k in missing], "n": [k[1] for k in missing], "v": [k[2] for k in missing]},
            )
            for tenant, name, version, spec, spec_hash in rows:
                key = (tenant, name, version)
                found[key] = self.put_raw(key, spec, spec_hash)
        return found
