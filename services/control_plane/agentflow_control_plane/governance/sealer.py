"""The loop that seals queued audit entries into their tenants' chains (see ``audit_store``)."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.tasks import stop_task
from agentflow_control_plane import metrics
from agentflow_control_plane.db.session import pg_autocommit
from agentflow_control_plane.governance import audit_store

log = logging.getLogger("agentflow.audit.sealer")


class AuditSealer:
    def __init__(self, engine: AsyncEngine, *, interval_s: float) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="audit-sealer")

    async def stop(self) -> None:
        await stop_task(self._task)
        try:  # what this process queued last should not wait for another process
            await self.seal_once()
        except Exception as exc:
            log.warning("sealing audit entries at shutdown failed (%s); another control plane will", exc)

    async def seal_once(self) -> int:
        async with pg_autocommit(self._engine) as conn:
            count = await audit_store.seal_all(conn)
        metrics.AUDIT_ENTRIES.inc(count)
        return count

    async def _loop(self) -> None:
        while True:
            try:
                # A full batch means more is waiting: go again at once.
                if await self.seal_once() >= audit_store.SEAL_BATCH:
                    continue
            except Exception as exc:
                log.warning("sealing audit entries failed (%s); retrying", exc)
            await asyncio.sleep(self._interval_s)
