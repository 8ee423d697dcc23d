"""The audit chain in Postgres: queueing with each change, sealing into the chain, reading, verifying.

Writing is two-phase, like a transparency log's queue and sequencer:

1. **Queue**: a change's entries are inserted into ``audit_queue`` by the change's own
   transaction (a data-modifying CTE of the engine's one flush statement, or one insert on
   the API paths). Nothing is written before commit and a rolled-back change leaves
   nothing; no lock is taken, so the engine's transactions never wait for a chain.
2. **Seal**: :func:`seal` takes a tenant's ``audit_heads`` row (``FOR UPDATE SKIP LOCKED``:
   another control plane sealing that tenant is left alone), links up to a few thousand
   queued entries after the head (:mod:`agentflow_core.audit`), inserts them into the
   forward-only ``audits`` table, deletes them from the queue and moves the head, in one
   transaction. The sealer runs every ``AGENTFLOW_AUDIT_SEAL_INTERVAL_S`` (0.2 s).

A queued entry is protected by the database only (UPDATE refused by a trigger) until it
is sealed; ``verify`` reports how many are pending.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from agentflow_core.audit import GENESIS_HASH, ChainVerifier, Prepared, format_ts, link_all, prepare
from agentflow_core.canonical import content_hash

#: one queued entry: (tenant, ts, actor, action, resource, data as JSON text)
QueuedEntry = tuple[str, datetime, str, str, str, str]

QUEUE_CASTS = ("text[]", "timestamptz[]", "text[]", "text[]", "text[]", "jsonb[]")
QUEUE_COLUMNS = "tenant_id, ts, actor, action, resource, data"

#: most entries sealed per tenant per transaction
SEAL_BATCH = 5000


def queued(tenant: str, ts: datetime, actor: str, action: str, resource: str, data: dict[str, Any]) -> QueuedEntry:
    """An entry to queue (cheap: canonicalization waits for the sealer)."""
    return (tenant, ts, actor, action, resource, orjson.dumps(data).decode())


def _prepare_row(tenant: str, row: asyncpg.Record) -> tuple[Prepared, str]:
    """A queued row ready to link, and the data text to store. An entry that cannot be
    canonicalized (it should never happen: the engine writes ids, hashes and integers)
    must not block its tenant's chain forever: it is sealed as a record of that fact."""
    data_text: str = row[5]
    try:
        return prepare(tenant=tenant, ts=row[1], actor=row[2], action=row[3], resource=row[4],
                       data=orjson.loads(data_text)), data_text  # fmt: skip
    except ValueError as exc:
        data = {"unsealable": content_hash(data_text), "reason": str(exc)[:200].replace("\x00", "")}
        entry = prepare(tenant=tenant, ts=row[1], actor=row[2][:256].replace("\x00", ""), action=row[3],
                        resource=row[4].replace("\x00", ""), data=data)  # fmt: skip
        return entry, orjson.dumps(data).decode()


async def enqueue(conn: asyncpg.Connection, entries: Sequence[QueuedEntry]) -> None:
    """Queue entries inside the caller's transaction (the API paths; the engine queues its
    own through ``WriteSet.flush``)."""
    if entries:
        columns = [list(col) for col in zip(*entries, strict=True)]
        await conn.execute(
            f"INSERT INTO audit_queue ({QUEUE_COLUMNS}) SELECT * FROM unnest("
            + ", ".join(f"${i + 1}::{cast}" for i, cast in enumerate(QUEUE_CASTS))
            + ")",
            *columns,
        )


APPEND_SQL = (
    "WITH appended AS (INSERT INTO audits (tenant_id, seq, ts, actor, action, resource, data, prev_hash, hash)"
    " SELECT $1, * FROM unnest($2::bigint[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],"
    " $7::jsonb[], $8::text[], $9::text[])), "
    "dequeued AS (DELETE FROM audit_queue WHERE id = ANY($10::bigint[])) "
    "UPDATE audit_heads SET seq = $11, hash = $12 WHERE tenant_id = $1"
)


async def seal(conn: asyncpg.Connection, tenant: str, *, batch: int = SEAL_BATCH) -> int:
    """Link one batch of ``tenant``'s queued entries into its chain. Returns how many were
    sealed (0 also when another process holds the tenant's head right now)."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO audit_heads (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING",
            tenant,
            GENESIS_HASH,
        )
        head = await conn.fetchrow(
            "SELECT seq, hash FROM audit_heads WHERE tenant_id = $1 FOR UPDATE SKIP LOCKED", tenant
        )
        if head is None:
            return 0
        rows = await conn.fetch(
            "SELECT id, ts, actor, action, resource, data::text FROM audit_queue WHERE tenant_id = $1"
            " ORDER BY id LIMIT $2",
            tenant,
            batch,
        )
        if not rows:
            return 0
        ready = [_prepare_row(tenant, r) for r in rows]
        linked = link_all(int(head[0]), str(head[1]), [p for p, _ in ready])
        await conn.execute(
            APPEND_SQL,
            tenant,
            [x.seq for x in linked],
            [x.entry.ts for x in linked],
            [x.entry.actor for x in linked],
            [x.entry.action for x in linked],
            [x.entry.resource for x in linked],
            [text for _, text in ready],
            [x.prev_hash for x in linked],
            [x.hash for x in linked],
            [r[0] for r in rows],
            linked[-1].seq,
            linked[-1].hash,
        )
        return len(linked)


async def seal_all(conn: asyncpg.Connection) -> int:
    """Seal what is queued for every tenant (one batch each). Returns how many entries."""
    tenants = [r[0] for r in await conn.fetch("SELECT DISTINCT tenant_id FROM audit_queue")]
    total = 0
    for tenant in sorted(tenants):
        total += await seal(conn, tenant)
    return total


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditFilter:
    run: uuid.UUID | None = None
    action: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int = 0
    limit: int = 100


def entry_dict(row: asyncpg.Record) -> dict[str, Any]:
    """A stored entry as the API and the verifier see it (the hashed members + ``hash``)."""
    return {
        "tenant": row["tenant_id"],
        "seq": int(row["seq"]),
        "ts": format_ts(row["ts"]),
        "actor": row["actor"],
        "action": row["action"],
        "resource": row["resource"],
        "data": orjson.loads(row["data"]),
        "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


async def list_entries(conn: asyncpg.Connection, tenant: str, f: AuditFilter) -> list[dict[str, Any]]:
    """One page of a tenant's entries in ``seq`` order, after ``f.after_seq`` (keyset paging)."""
    where = ["tenant_id = $1", "seq > $2"]
    args: list[Any] = [tenant, f.after_seq]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if f.run is not None:
        where.append(f"data ? 'run' AND data->>'run' = {arg(str(f.run))}")
    if f.action:
        # 'step.*' selects a family of actions
        if f.action.endswith(".*"):
            where.append(f"action LIKE {arg(f.action[:-1] + '%')}")
        else:
            where.append(f"action = {arg(f.action)}")
    if f.actor:
        where.append(f"actor = {arg(f.actor)}")
    if f.since is not None:
        where.append(f"ts >= {arg(f.since)}")
    if f.until is not None:
        where.append(f"ts < {arg(f.until)}")
    sql = (
        "SELECT tenant_id, seq, ts, actor, action, resource, data::text AS data, prev_hash, hash FROM audits WHERE "
        + " AND ".join(where)
        + f" ORDER BY seq LIMIT {arg(f.limit)}"
    )
    return [entry_dict(r) for r in await conn.fetch(sql, *args)]


async def stream_entries(
    conn: asyncpg.Connection, tenant: str, *, page: int = 20_000
) -> AsyncIterator[list[asyncpg.Record]]:
    """All of a tenant's entries in ``seq`` order, a page at a time (keyset paging: no
    long transaction, constant memory, index-only navigation by the primary key)."""
    after = 0
    while True:
        rows = await conn.fetch(
            "SELECT seq, ts, actor, action, resource, data::text, prev_hash, hash FROM audits"
            " WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            tenant,
            after,
            page,
        )
        if not rows:
            return
        yield rows
        after = int(rows[-1][0])


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    length: int
    head_hash: str
    first_bad_seq: int | None
    problem: str | None
    recorded_length: int
    anchors_checked: int
    elapsed_s: float
    pending: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "length": self.length,
            "head_hash": self.head_hash,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "recorded_length": self.recorded_length,
            "anchors_checked": self.anchors_checked,
            "elapsed_s": round(self.elapsed_s, 3),
            "pending": self.pending,
        }


async def verify(conn: asyncpg.Connection, tenant: str, anchors: dict[int, str] | None = None) -> Verification:
    """Walk the whole chain, recomputing every hash. ``anchors`` (seq -> hash) are the
    externally published heads the stored chain must still match."""
    started = time.perf_counter()
    checker = ChainVerifier(tenant, anchors=dict(anchors or {}))
    recorded = await conn.fetchval("SELECT seq FROM audit_heads WHERE tenant_id = $1", tenant)
    feed = checker.feed
    async for rows in stream_entries(conn, tenant):
        for seq, ts, actor, action, resource, data, prev_hash, stored in rows:
            body = {
                "action": action,
                "actor": actor,
                "data": orjson.loads(data),
                "prev_hash": prev_hash,
                "resource": resource,
                "seq": int(seq),
                "tenant": tenant,
                "ts": format_ts(ts),
            }
            if not feed(body, stored):
                break
        if not checker.ok:
            break
    checker.finish(expected_length=int(recorded) if recorded is not None else None)
    return Verification(
        ok=checker.ok,
        length=checker.length,
        head_hash=checker.head_hash,
        first_bad_seq=checker.first_bad_seq,
        problem=checker.problem,
        recorded_length=int(recorded or 0),
        anchors_checked=checker.anchors_checked,
        elapsed_s=time.perf_counter() - started,
        pending=int(await conn.fetchval("SELECT count(*) FROM audit_queue WHERE tenant_id = $1", tenant)),
    )
