"""Bulk writes of one engine transaction: steps, envelopes, outbox rows, run updates.

Everything a decision produces is collected in a :class:`WriteSet` and flushed with a
fixed number of set-based statements (``unnest`` of arrays), whatever the batch size, so
the per-step cost on the hot path is a few list appends rather than a round trip.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from agentflow_bus.subjects import Names
from agentflow_core.envelope import ENVELOPE_VERSION, seal
from agentflow_core.planners import StepRequest
from agentflow_core.spec import WorkflowSpec

def step_id_for(run_id: uuid.UUID, seq: int) -> uuid.UUID:
    """Deterministic step id, so replaying a run yields the same ids."""
    return uuid.uuid5(run_id, f"step:{seq}")


def traceparent_for(run_id: uuid.UUID) -> str:
    """W3C trace context: one trace per run (trace id = run id), a fresh span per message."""
    return f"00-{run_id.hex}-{os.urandom(8).hex()}-01"


@dataclass(slots=True)
class OutMsg:
    tenant: str
    run_id: uuid.UUID
    subject: str
    msg_id: str
    body: bytes
    traceparent: str
    outbox_id: int = 0


@dataclass(slots=True)
class WriteSet:
    names: Names
    now: datetime
    new_steps: list[tuple[Any, ...]] = field(default_factory=list)
    envelopes: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[OutMsg] = field(default_factory=list)
    # (id, status, attempt, attempts, pickups_before, worker, started_at, finished_at,
    #  next_attempt_at, output_json, error, step_hash, result_hash, queued_at)
    step_updates: list[tuple[Any, ...]] = field(default_factory=list)
    # run id -> (status, planner_state_json, output_json, error, started_at, finished_at)
    run_updates: dict[uuid.UUID, tuple[Any, ...]] = field(default_factory=dict)

    def add_envelope(
        self, tenant: str, run_id: uuid.UUID, step_id: uuid.UUID, attempt: int, kind: str, digest: str, body: bytes
    ) -> None:
        self.envelopes.append((tenant, run_id, step_id, attempt, kind, digest, body))

    def dispatch_attempt(
        self,
        *,
        tenant: str,
        run_id: uuid.UUID,
        step_id: uuid.UUID,
        queue: str,
        body: dict[str, Any],
    ) -> str:
        """Seal a step envelope for an attempt and queue it for publishing. Returns its hash."""
        wire, digest = seal(body)
        attempt = body["attempt"]
        self.add_envelope(tenant, run_id, step_id, attempt, "step", digest, wire)
        self.outbox.append(
            OutMsg(
                tenant=tenant,
                run_id=run_id,
                subject=self.names.step_subject(queue, tenant),
                msg_id=f"s:{step_id}:{attempt}",
                body=wire,
                traceparent=traceparent_for(run_id),
            )
        )
        return digest

    def new_step(self, spec: WorkflowSpec, tenant: str, run_id: uuid.UUID, req: StepRequest) -> None:
        agent = spec.agents[req.agent]
        step_id = step_id_for(run_id, req.seq)
        body = {
            "v": ENVELOPE_VERSION,
            "kind": "step",
            "tenant": tenant,
            "run": str(run_id),
            "step": str(step_id),
            "seq": req.seq,
            "attempt": 1,
            "agent": {
                "name": req.agent,
                "type": agent.type,
                "config": agent.config,
                "timeout_s": agent.timeout_s,
            },
            "payload": req.payload,
        }
        digest = self.dispatch_attempt(tenant=tenant, run_id=run_id, step_id=step_id, queue=agent.queue, body=body)
        self.new_steps.append(
            (step_id, tenant, run_id, req.seq, req.state, req.agent, agent.queue, agent.retry.max_attempts, digest)
        )

    async def flush(self, conn: AsyncConnection) -> list[OutMsg]:
        """Write everything collected; returns the outbox messages with their row ids."""
        if self.new_steps:
            cols = list(zip(*self.new_steps, strict=True))
            await conn.execute(
                text(
                    "INSERT INTO steps (id, tenant_id, run_id, seq, state, agent, queue, max_attempts, step_hash,"
                    " status, attempt, attempts, pickups_before, queued_at) "
                    "SELECT u.*, 'queued', 1, 0, 0, CAST(:now AS timestamptz) FROM unnest("
                    "CAST(:id AS uuid[]), CAST(:tenant AS text[]), CAST(:run AS uuid[]), CAST(:seq AS int[]),"
                    " CAST(:state AS text[]), CAST(:agent AS text[]), CAST(:queue AS text[]),"
                    " CAST(:max AS int[]), CAST(:hash AS text[])) AS u"
                ),
                {
                    "id": list(cols[0]),
                    "tenant": list(cols[1]),
                    "run": list(cols[2]),
                    "seq": list(cols[3]),
                    "state": list(cols[4]),
                    "agent": list(cols[5]),
                    "queue": list(cols[6]),
                    "max": list(cols[7]),
                    "hash": list(cols[8]),
                    "now": self.now,
                },
            )
        if self.step_updates:
            cols = list(zip(*self.step_updates, strict=True))
            await conn.execute(
                text(
                    "UPDATE steps AS s SET status = u.status, attempt = u.attempt, attempts = u.attempts,"
                    " pickups_before = u.pickups_before, worker = u.worker, started_at = u.started_at,"
                    " finished_at = u.finished_at, next_attempt_at = u.next_attempt_at,"
                    " output = CAST(u.output AS jsonb), error = u.error, step_hash = u.step_hash,"
                    " result_hash = u.result_hash, queued_at = u.queued_at "
                    "FROM unnest(CAST(:id AS uuid[]), CAST(:status AS text[]), CAST(:attempt AS int[]),"
                    " CAST(:attempts AS int[]), CAST(:pickups AS int[]), CAST(:worker AS text[]),"
                    " CAST(:started AS timestamptz[]), CAST(:finished AS timestamptz[]),"
                    " CAST(:next AS timestamptz[]), CAST(:output AS text[]), CAST(:error AS text[]),"
                    " CAST(:shash AS text[]), CAST(:rhash AS text[]), CAST(:queued AS timestamptz[]))"
                    " AS u(id, status, attempt, attempts, pickups_before, worker, started_at, finished_at,"
                    " next_attempt_at, output, error, step_hash, result_hash, queued_at) "
                    "WHERE s.id = u.id"
                ),
                {
                    "id": list(cols[0]),
                    "status": list(cols[1]),
                    "attempt": list(cols[2]),
                    "attempts": list(cols[3]),
                    "pickups": list(cols[4]),
                    "worker": list(cols[5]),
                    "started": list(cols[6]),
                    "finished": list(cols[7]),
                    "next": list(cols[8]),
                    "output": list(cols[9]),
                    "error": list(cols[10]),
                    "shash": list(cols[11]),
                    "rhash": list(cols[12]),
                    "queued": list(cols[13]),
                },
            )
        if self.run_updates:
            ids = list(self.run_updates)
            cols = list(zip(*self.run_updates.values(), strict=True))
            await conn.execute(
                text(
                    "UPDATE runs AS r SET status = u.status, planner_state = CAST(u.state AS jsonb),"
                    " output = CAST(u.output AS jsonb), error = u.error, started_at = u.started_at,"
                    " finished_at = u.finished_at "
                    "FROM unnest(CAST(:id AS uuid[]), CAST(:status AS text[]), CAST(:state AS text[]),"
                    " CAST(:output AS text[]), CAST(:error AS text[]), CAST(:started AS timestamptz[]),"
                    " CAST(:finished AS timestamptz[])) AS u(id, status, state, output, error, started_at,"
                    " finished_at) WHERE r.id = u.id"
                ),
                {
                    "id": ids,
                    "status": list(cols[0]),
                    "state": list(cols[1]),
                    "output": list(cols[2]),
                    "error": list(cols[3]),
                    "started": list(cols[4]),
                    "finished": list(cols[5]),
                },
            )
        if self.envelopes:
            await insert_envelopes(conn, self.envelopes)
        if self.outbox:
            rows = await conn.execute(
                text(
                    "INSERT INTO outbox (tenant_id, run_id, subject, msg_id, body, traceparent, created_at) "
                    "SELECT u.*, CAST(:now AS timestamptz) FROM unnest(CAST(:tenant AS text[]),"
                    " CAST(:run AS uuid[]), CAST(:subject AS text[]), CAST(:msg_id AS text[]),"
                    " CAST(:body AS bytea[]), CAST(:tp AS text[])) AS u RETURNING id"
                ),
                {
                    "tenant": [m.tenant for m in self.outbox],
                    "run": [m.run_id for m in self.outbox],
                    "subject": [m.subject for m in self.outbox],
                    "msg_id": [m.msg_id for m in self.outbox],
                    "body": [m.body for m in self.outbox],
                    "tp": [m.traceparent for m in self.outbox],
                    "now": self.now,
                },
            )
            # INSERT ... SELECT FROM unnest preserves order in practice but not by
            # contract; ids are only used to delete published rows, so order is moot.
            for msg, (outbox_id,) in zip(self.outbox, rows, strict=True):
                msg.outbox_id = outbox_id
        return self.outbox


async def insert_envelopes(
    conn: AsyncConnection, envelopes: list[tuple[Any, ...]], *, returning: bool = False
) -> set[tuple[uuid.UUID, int]]:
    """Insert envelopes; step/result ones are unique per (step, attempt, kind).

    With ``returning``, yields the (step, attempt) pairs that were new: a duplicate
    result (redelivered, re-published) inserts nothing and so completes nothing.
    """
    cols = list(zip(*envelopes, strict=True))
    sql = (
        "INSERT INTO envelopes (tenant_id, run_id, step_id, attempt, kind, hash, body) "
        "SELECT * FROM unnest(CAST(:tenant AS text[]), CAST(:run AS uuid[]), CAST(:step AS uuid[]),"
        " CAST(:attempt AS int[]), CAST(:kind AS text[]), CAST(:hash AS text[]), CAST(:body AS bytea[])) "
        "ON CONFLICT (step_id, attempt, kind) WHERE kind IN ('step', 'result') DO NOTHING"
    )
    if returning:
        sql += " RETURNING step_id, attempt"
    result = await conn.execute(
        text(sql),
        {
            "tenant": list(cols[0]),
            "run": list(cols[1]),
            "step": list(cols[2]),
            "attempt": list(cols[3]),
            "kind": list(cols[4]),
            "hash": list(cols[5]),
            "body": list(cols[6]),
        },
    )
    if not returning:
        return set()
    return {(row[0], row[1]) for row in result}


def dumps_or_none(value: Any) -> str | None:
    """JSON text for a jsonb column; Python None stays SQL NULL."""
    return None if value is None else orjson.dumps(value).decode()
