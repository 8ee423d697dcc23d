"""The audit chain in Postgres: appending inside the caller's transaction, reading, verifying.

Appending locks each affected tenant's ``audit_heads`` row (in tenant order, so two
transactions never deadlock) as the LAST lock its transaction takes: every engine path
locks runs and steps first. The head lock is held only for two short statements and the
commit, and tenants never wait for each other. Entries are canonicalized before the lock
(:func:`agentflow_core.audit.prepare`); under it only SHA-256 links are computed.

Nothing is appended before commit: the entries are written by the same transaction as
the change they record, so a rolled-back change leaves no entry.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from agentflow_core.audit import GENESIS_HASH, ChainVerifier, Linked, Prepared, format_ts, link_all

HEADS_SQL = (
    "SELECT tenant_id, seq, hash FROM audit_heads WHERE tenant_id = ANY($1::text[]) ORDER BY tenant_id FOR UPDATE"
)

APPEND_SQL = (
    "WITH appended AS (INSERT INTO audits (tenant_id, seq, ts, actor, action, resource, data, prev_hash, hash)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],"
    " $7::jsonb[], $8::text[], $9::text[])) "
    "UPDATE audit_heads AS h SET seq = u.seq, hash = u.hash"
    " FROM unnest($10::text[], $11::bigint[], $12::text[]) AS u(tenant_id, seq, hash)"
    " WHERE h.tenant_id = u.tenant_id"
)


async def append(conn: asyncpg.Connection, entries: Sequence[Prepared]) -> list[Linked]:
    """Append ``entries`` (in order, per tenant) to their tenants' chains. Must run inside
    the transaction that makes the recorded changes, as its last statements."""
    if not entries:
        return []
    tenants = sorted({e.tenant for e in entries})
    heads = {r[0]: (int(r[1]), str(r[2])) for r in await conn.fetch(HEADS_SQL, tenants)}
    missing = [t for t in tenants if t not in heads]
    if missing:  # a tenant's first entry ever: create its head, then lock it like the rest
        await conn.execute(
            "INSERT INTO audit_heads (tenant_id, seq, hash) SELECT t, 0, $2 FROM unnest($1::text[]) AS t"
            " ON CONFLICT (tenant_id) DO NOTHING",
            missing,
            GENESIS_HASH,
        )
        heads = {r[0]: (int(r[1]), str(r[2])) for r in await conn.fetch(HEADS_SQL, tenants)}
    by_tenant: dict[str, list[Prepared]] = {}
    for entry in entries:
        by_tenant.setdefault(entry.tenant, []).append(entry)
    linked: list[Linked] = []
    new_heads: list[tuple[str, int, str]] = []
    for tenant in tenants:
        seq, head = heads[tenant]
        chain = link_all(seq, head, by_tenant[tenant])
        linked += chain
        new_heads.append((tenant, chain[-1].seq, chain[-1].hash))
    await conn.execute(
        APPEND_SQL,
        [x.entry.tenant for x in linked],
        [x.seq for x in linked],
        [x.entry.ts for x in linked],
        [x.entry.actor for x in linked],
        [x.entry.action for x in linked],
        [x.entry.resource for x in linked],
        [orjson.dumps(x.entry.data).decode() for x in linked],
        [x.prev_hash for x in linked],
        [x.hash for x in linked],
        [h[0] for h in new_heads],
        [h[1] for h in new_heads],
        [h[2] for h in new_heads],
    )
    return linked


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
        }


async def verify(conn: asyncpg.Connection, tenant: str, anchors: dict[int, str] | None = None) -> Verification:
    """Walk the whole chain, recomputing every hash. ``anchors`` (seq -> hash) are the
    externally published heads the stored chain must still match."""
    import time

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
    )
