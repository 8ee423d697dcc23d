"""What engine transactions need to estimate the steps they dispatch and to keep budgets."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from agentflow_control_plane.governance.budgets import BudgetBook, BudgetCache
from agentflow_control_plane.governance.calibration import CalibrationCache
from agentflow_control_plane.governance.estimates import Costing, Estimator

if TYPE_CHECKING:
    from agentflow_control_plane.engine.rows import RunRow
    from agentflow_control_plane.engine.specs import CompiledWorkflow
    from agentflow_control_plane.engine.writes import WriteSet


@dataclass(slots=True)
class CostServices:
    """One per control plane: the estimator and the budget and calibration caches."""

    estimator: Estimator
    budgets: BudgetCache
    calibration: CalibrationCache

    async def prepare(
        self,
        conn: asyncpg.Connection,
        writes: WriteSet,
        runs: Iterable[RunRow],
        compiled: Mapping[tuple[str, str, int], CompiledWorkflow],
        spending: Collection[uuid.UUID] = (),
    ) -> None:
        """Lock the budget windows of the runs that may spend (a workflow with priced agents,
        or a result in ``spending`` reporting usage) and load the correction factors their
        steps need. Free workflows reserve and spend nothing, so their transactions skip the
        window locks even when the tenant has budgets."""
        costly = [
            r
            for r in runs
            if r.id in spending or (r.key in compiled and self.estimator.needs_costing(compiled[r.key].spec))
        ]
        if not costly:
            return
        writes.attach_budgets(await BudgetBook.open(conn, self.budgets, [(r.key[0], r.id) for r in costly], writes.now))
        writes.costing = Costing(self.estimator, await self.calibration.get_many(conn, {r.key[0] for r in costly}))
