"""Timers: dispatching retries whose backoff has elapsed, and planner timer ticks.

A failed attempt leaves its step ``queued`` with ``next_attempt_at`` set and no step
hash. When the time comes, the step envelope of the previous attempt is re-sealed with
the next attempt number (same payload) and goes through the outbox like any dispatch.

A run whose planner asked for a timer (``runs.wake_at``: a behavior-tree timeout or
retry, a conservative re-run) gets ``on_timer`` when the time comes; its decision is
applied like any other.

Rows are claimed with ``FOR UPDATE SKIP LOCKED``, so any number of control planes can
run this loop.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import orjson
from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.subjects import Names
from agentflow_bus.tasks import stop_task
from agentflow_control_plane.db.session import pg_transaction
from agentflow_control_plane.engine.decisions import apply_decision, from_ms, now_ms, publish_cancels
from agentflow_control_plane.engine.dispatcher import Dispatcher
from agentflow_control_plane.engine.rows import RunRow
from agentflow_control_plane.engine.specs import SpecCache
from agentflow_control_plane.engine.writes import WriteSet
from agentflow_control_plane.governance.costing import CostServices

log = logging.getLogger("agentflow.timers")

DUE_SQL = (
    "SELECT s.id, s.run_id, s.tenant_id, s.attempt, s.queue, e.body, r.workflow_name, s.state, r.traceparent "
    "FROM steps s "
    "JOIN envelopes e ON e.step_id = s.id AND e.attempt = s.attempt - 1 AND e.kind = 'step' "
    "JOIN runs r ON r.id = s.run_id "
    "WHERE s.next_attempt_at <= now() AND s.status = 'queued' "
    "ORDER BY s.next_attempt_at LIMIT $1 FOR UPDATE OF s SKIP LOCKED"
)


WAKE_SQL = (
    "SELECT id, tenant_id, workflow_name, workflow_version, status, planner_state, input, started_at, traceparent "
    "FROM runs "
    "WHERE wake_at <= now() AND status IN ('pending', 'running') "
    "ORDER BY wake_at LIMIT $1 FOR UPDATE SKIP LOCKED"
)


class Timers:
    def __init__(
        self,
        engine: AsyncEngine,
        dispatcher: Dispatcher,
        names: Names,
        interval_s: float,
        *,
        nc: Client | None = None,
        specs: SpecCache | None = None,
        governance: bool = True,
        costs: CostServices | None = None,
    ) -> None:
        self._costs = costs
        self._governance = governance
        self._nc = nc
        self._specs = specs or SpecCache()
        self._engine = engine
        self._dispatcher = dispatcher
        self._names = names
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="timers")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def dispatch_due_retries(self, limit: int = 500) -> int:
        now = datetime.now(UTC)
        writes = WriteSet(self._names, now, governance=self._governance)
        async with pg_transaction(self._engine) as conn:
            rows = await conn.fetch(DUE_SQL, limit)
            if not rows:
                return 0
            updates = []
            for step_id, run_id, tenant, attempt, queue, previous, workflow, name, trace in rows:
                body = orjson.loads(bytes(previous))
                body.pop("hash", None)
                body["attempt"] = attempt
                digest = writes.dispatch_attempt(tenant=tenant, run_id=run_id, step_id=step_id, queue=queue, body=body,
                                                 workflow=workflow, name=name, trace=trace)  # fmt: skip
                updates.append((step_id, digest))
            await conn.execute(
                "UPDATE steps AS s SET step_hash = u.hash, next_attempt_at = NULL, queued_at = $3 "
                "FROM unnest($1::uuid[], $2::text[]) AS u(id, hash) WHERE s.id = u.id",
                [u[0] for u in updates],
                [u[1] for u in updates],
                now,
            )
            await writes.flush(conn)
        await self._dispatcher.publish(writes.outbox)
        return len(rows)

    async def tick_due_runs(self, limit: int = 200) -> int:
        """Call ``on_timer`` for runs whose planner timer is due."""
        now = datetime.now(UTC)
        writes = WriteSet(self._names, now, governance=self._governance)
        async with pg_transaction(self._engine) as conn:
            rows = await conn.fetch(WAKE_SQL, limit)
            if not rows:
                return 0
            runs = [RunRow(r[0], r[4], r[5], r[6], (r[1], r[2], r[3]), r[7], None, r[8]) for r in rows]
            compiled = await self._specs.get_many(conn, {run.key for run in runs})
            if self._costs is not None:
                await self._costs.prepare(conn, writes, runs, compiled)
            for run in runs:
                workflow = compiled[run.key]
                decision = workflow.planner.on_timer(run.state, run.input, now_ms(now))
                if decision.ignored:
                    # Not due, or stale: keep only the timer the planner still wants.
                    run.wake_at = from_ms(decision.wake_at_ms)
                    run.dirty = True
                else:
                    apply_decision(
                        decision, run=run, spec=workflow.spec, tenant=run.key[0], writes=writes, now=now, loaded={}
                    )
                writes.run_updates[run.id] = run.update_tuple()
            await writes.flush(conn)
        await self._dispatcher.publish(writes.outbox)
        if writes.cancel_notices and self._nc is not None:
            await publish_cancels(self._nc, self._names, writes.cancel_notices)
        return len(rows)

    async def _loop(self) -> None:
        while True:
            try:
                count = await self.dispatch_due_retries() + await self.tick_due_runs()
                if count:
                    continue
            except Exception as exc:
                log.warning("timer pass failed (%s); retrying", exc)
            await asyncio.sleep(self._interval_s)
