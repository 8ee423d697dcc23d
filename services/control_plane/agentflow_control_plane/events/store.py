"""Run events in Postgres: numbering queued events, reading them back, tickets.

Engine statements queue events in ``event_queue`` (see ``WriteSet.event``). The
:class:`EventSequencer` moves them to ``events`` in batches and gives each a cursor from
the one-row ``event_cursor`` counter. Batches are numbered one at a time (an advisory
lock, across every control plane) and each commits before the next starts, so cursors
become visible in increasing order: a reader that has seen cursor N never later finds a
new event below N. Events of one run are queued by transactions holding that run's lock,
so they are numbered in the order they happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.tasks import stop_task
from agentflow_control_plane.db.session import pg_autocommit, pg_transaction
from agentflow_control_plane.engine.writes import EVENTS_QUEUED

log = logging.getLogger("agentflow.events")

#: the NOTIFY channel; the payload is the highest cursor just committed
CHANNEL = "agentflow_events"
#: pg_advisory_xact_lock key of the sequencer ("AFEVENTS" in ASCII)
SEQUENCER_LOCK = 0x4146_4556_454E_5453
TICKET_TTL_S = 60

SEQUENCE_SQL = """
WITH moved AS (
    DELETE FROM event_queue WHERE id IN (SELECT id FROM event_queue ORDER BY id LIMIT $1)
    RETURNING id, tenant_id, run_id, workflow, step_id, type, data, created_at
), numbered AS (
    SELECT m.*, row_number() OVER (ORDER BY m.id) AS n FROM moved m
), bumped AS (
    UPDATE event_cursor SET last = last + (SELECT count(*) FROM numbered)
    WHERE id = 1 RETURNING last - (SELECT count(*) FROM numbered) AS base
)
INSERT INTO events (cursor, tenant_id, run_id, workflow, step_id, type, data, created_at)
SELECT b.base + n.n, n.tenant_id, n.run_id, n.workflow, n.step_id, n.type, n.data, n.created_at
FROM numbered n, bumped b
RETURNING cursor
"""

EVENT_COLUMNS = "cursor, type, created_at, run_id, workflow, step_id, data"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    cursor: int
    tenant: str
    run_id: uuid.UUID
    workflow: str | None
    type: str
    #: the event as the stream sends it (JSON), serialized once for every subscriber
    wire: bytes

    @property
    def final(self) -> bool:
        return self.type in ("run.succeeded", "run.failed", "run.cancelled")


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_event(tenant: str, row: Sequence[Any]) -> StoredEvent:
    """A row of ``EVENT_COLUMNS``; ``data`` is JSON text from a plain asyncpg connection and
    already decoded from a pooled one (SQLAlchemy installs a jsonb codec)."""
    cursor, kind, created, run_id, workflow, step_id, data = row
    body = orjson.Fragment(data) if isinstance(data, str | bytes) else data
    wire = orjson.dumps(
        {"cursor": cursor, "type": kind, "ts": _ts(created), "run_id": str(run_id), "workflow": workflow,
         "step_id": str(step_id) if step_id is not None else None, "data": body}
    )  # fmt: skip
    return StoredEvent(cursor, tenant, run_id, workflow, kind, wire)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What one stream wants: a run, or the tenant's events narrowed by workflow and type."""

    tenant: str
    run_id: uuid.UUID | None = None
    workflow: str | None = None
    #: type prefixes ("run.", "step.failed"); empty means every type
    types: tuple[str, ...] = ()

    def matches(self, event: StoredEvent) -> bool:
        if event.tenant != self.tenant:
            return False
        if self.run_id is not None and event.run_id != self.run_id:
            return False
        if self.workflow is not None and event.workflow != self.workflow:
            return False
        return not self.types or event.type.startswith(self.types)


async def read_events(
    conn: asyncpg.Connection, flt: EventFilter, after: int, upto: int, limit: int
) -> list[StoredEvent]:
    """Events matching ``flt`` with ``after < cursor <= upto``, oldest first."""
    where = ["tenant_id = $1", "cursor > $2", "cursor <= $3"]
    params: list[Any] = [flt.tenant, after, upto]
    if flt.run_id is not None:
        params.append(flt.run_id)
        where.append(f"run_id = ${len(params)}")
    if flt.workflow is not None:
        params.append(flt.workflow)
        where.append(f"workflow = ${len(params)}")
    if flt.types:
        params.append([t.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for t in flt.types])
        where.append(f"type LIKE ANY(${len(params)}::text[])")
    params.append(limit)
    rows = await conn.fetch(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY cursor LIMIT ${len(params)}",
        *params,
    )
    return [to_event(flt.tenant, r) for r in rows]


async def read_new(conn: asyncpg.Connection, after: int, limit: int) -> list[StoredEvent]:
    """Every tenant's events after ``after`` (the hub's feed)."""
    rows = await conn.fetch(
        f"SELECT tenant_id, {EVENT_COLUMNS} FROM events WHERE cursor > $1 ORDER BY cursor LIMIT $2", after, limit
    )
    return [to_event(r[0], r[1:]) for r in rows]


async def positions(conn: asyncpg.Connection) -> tuple[int, int]:
    """(last cursor handed out, highest cursor deleted by retention)."""
    row = await conn.fetchrow("SELECT last, pruned FROM event_cursor WHERE id = 1")
    return (int(row[0]), int(row[1])) if row is not None else (0, 0)


# --- tickets -----------------------------------------------------------------------------


def _ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


async def issue_ticket(
    engine: AsyncEngine, *, tenant: str, subject: str, roles: frozenset[str]
) -> tuple[str, datetime]:
    ticket = secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + timedelta(seconds=TICKET_TTL_S)
    async with pg_autocommit(engine) as conn:
        await conn.execute(
            "INSERT INTO event_tickets (hash, tenant_id, subject, roles, expires_at) VALUES ($1, $2, $3, $4, $5)",
            _ticket_hash(ticket), tenant, subject, sorted(roles), expires,
        )  # fmt: skip
    return ticket, expires


async def redeem_ticket(engine: AsyncEngine, ticket: str) -> tuple[str, str, frozenset[str]] | None:
    """(tenant, subject, roles) of a valid ticket, which is used up; None otherwise.
    Lookup is by the ticket's SHA-256, so no ticket is ever compared character by character."""
    if not ticket or len(ticket) > 200:
        return None
    async with pg_autocommit(engine) as conn:
        row = await conn.fetchrow(
            "DELETE FROM event_tickets WHERE hash = $1 AND expires_at > now() RETURNING tenant_id, subject, roles",
            _ticket_hash(ticket),
        )
    return None if row is None else (row[0], row[1], frozenset(row[2]))


# --- the sequencer -----------------------------------------------------------------------


class EventSequencer:
    """Moves queued events into ``events`` with their cursors, then NOTIFYs the hubs.

    Every control plane runs one; the advisory lock lets one at a time work (the others
    skip that round). Woken at once by this process's commits, and polling for the
    events other processes queue. Also deletes events past retention, and expired tickets.
    """

    BATCH = 5000

    def __init__(
        self, engine: AsyncEngine, *, poll_s: float = 0.1, coalesce_s: float = 0.02, retention_days: float = 7.0
    ) -> None:
        self._coalesce_s = coalesce_s
        self._engine = engine
        self._poll_s = poll_s
        self._retention = timedelta(days=retention_days)
        self._task: asyncio.Task[None] | None = None
        self._next_prune = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="event-sequencer")

    async def stop(self) -> None:
        await stop_task(self._task)
        with contextlib.suppress(Exception):
            await self.sequence_once()  # number what this process queued last

    async def sequence_once(self) -> int:
        """Number one batch of queued events. Returns how many (0 if another process holds the lock)."""
        async with pg_transaction(self._engine) as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SEQUENCER_LOCK):
                return 0
            cursors = await conn.fetch(SEQUENCE_SQL, self.BATCH)
            if cursors:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(max(r[0] for r in cursors)))
        return len(cursors)

    async def prune_once(self) -> int:
        """Delete events older than the retention period (and expired tickets)."""
        cutoff = datetime.now(UTC) - self._retention
        async with pg_transaction(self._engine) as conn:
            top = await conn.fetchval(
                "WITH gone AS (DELETE FROM events WHERE cursor IN (SELECT cursor FROM events WHERE created_at < $1"
                " ORDER BY cursor LIMIT 50000) RETURNING cursor) SELECT max(cursor) FROM gone",
                cutoff,
            )
            if top is not None:
                await conn.execute("UPDATE event_cursor SET pruned = GREATEST(pruned, $1) WHERE id = 1", top)
            await conn.execute("DELETE FROM event_tickets WHERE expires_at < now()")
        return 0 if top is None else 1

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._poll_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(EVENTS_QUEUED.wait(), delay)
                # Let the engine's next commits join this batch: one numbering round per
                # commit would double the transactions the engine's work causes.
                await asyncio.sleep(self._coalesce_s)
            EVENTS_QUEUED.clear()
            try:
                while await self.sequence_once() >= self.BATCH:
                    pass
                if loop.time() >= self._next_prune:
                    self._next_prune = loop.time() + 600
                    await self.prune_once()
                delay = self._poll_s
            except Exception as exc:
                log.warning("numbering run events failed (%s); retrying", exc)
                delay = min(max(delay * 2, 0.5), 5.0)
