"""Process-wide cache of workflow versions and their planners.

Workflow versions are immutable, so a (tenant, name, version) entry never goes stale.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import asyncpg

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

    async def get_many(self, conn: asyncpg.Connection, keys: set[SpecKey]) -> dict[SpecKey, CompiledWorkflow]:
        found: dict[SpecKey, CompiledWorkflow] = {}
        missing: list[SpecKey] = []
        for key in keys:
            item = self._items.get(key)
            if item is None:
                missing.append(key)
            else:
                found[key] = item
        if missing:
            rows = await conn.fetch(
                "SELECT tenant_id, name, version, spec, spec_hash FROM workflow_versions "
                "WHERE (tenant_id, name, version) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::int[]))",
                [k[0] for k in missing],
                [k[1] for k in missing],
                [k[2] for k in missing],
            )
            for tenant, name, version, spec, spec_hash in rows:
                key = (tenant, name, version)
                found[key] = self.put_raw(key, spec, spec_hash)
        return found
