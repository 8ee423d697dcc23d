"""Setting, reading and deleting budgets (the engine's side is ``governance.budgets``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from agentflow_control_plane.governance import audit_store
from agentflow_control_plane.governance.budgets import Budget, Window, budget_from_row
from agentflow_control_plane.governance.ledger import money
from agentflow_core.errors import NotFound

#: day and month windows do not depend on the run
_NO_RUN = uuid.UUID(int=0)

COLUMNS = "name, scope, target, period, limit_usd, limit_tokens, enforcement, created_at, updated_at"


@dataclass(frozen=True, slots=True)
class Stored:
    budget: dict[str, Any]
    created: bool


def _public(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"],
        "scope": row["scope"],
        "target": row["target"],
        "period": row["period"],
        "limit_usd": None if row["limit_usd"] is None else money(row["limit_usd"]),
        "limit_tokens": row["limit_tokens"],
        "enforcement": row["enforcement"],
    }


WINDOWS_SQL = (
    'SELECT budget, "window", spent_usd, spent_tokens, reserved_usd, reserved_tokens, warned FROM budget_windows'
    ' WHERE tenant_id = $1 AND (budget, "window") IN (SELECT * FROM unnest($2::text[], $3::text[]))'
)


async def _windows(conn: asyncpg.Connection, tenant: str, wanted: list[tuple[Budget, str]]) -> list[Window]:
    """The stored windows ``(budget, key)``; a window nothing was counted in yet is empty."""
    rows = await conn.fetch(WINDOWS_SQL, tenant, [b.name for b, _ in wanted], [k for _, k in wanted])
    found = {(r[0], r[1]): r for r in rows}
    out = []
    for budget, key in wanted:
        w = found.get((budget.name, key))
        out.append(Window(budget, key) if w is None else Window(budget, key, w[2], w[3], w[4], w[5], w[6]))
    return out


async def _current(conn: asyncpg.Connection, tenant: str, budgets: list[asyncpg.Record]) -> list[dict[str, Any]]:
    """Each budget with its current day or month window (``None`` for per-run budgets)."""
    now = datetime.now(UTC)
    periodic = [budget_from_row(r) for r in budgets if r["period"] != "run"]
    windows = {w.budget.name: w for w in await _windows(conn, tenant, [(b, b.window(_NO_RUN, now)) for b in periodic])}
    out = []
    for r in budgets:
        window = windows.get(r["name"])
        out.append(
            _public(r)
            | {"created_at": r["created_at"], "updated_at": r["updated_at"],
               "current": window.as_dict() if window is not None else None}
        )  # fmt: skip
    return out


async def list_budgets(conn: asyncpg.Connection, tenant: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM budgets WHERE tenant_id = $1 ORDER BY name", tenant)
    return await _current(conn, tenant, rows)


async def get_budget(conn: asyncpg.Connection, tenant: str, name: str) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM budgets WHERE tenant_id = $1 AND name = $2", tenant, name)
    if row is None:
        raise NotFound(f"budget '{name}' not found")
    return (await _current(conn, tenant, [row]))[0]


async def _forget_windows(conn: asyncpg.Connection, tenant: str, name: str) -> None:
    # What was counted under another meaning (or under a deleted budget of the same name)
    # must not count against this one.
    await conn.execute("DELETE FROM budget_reservations WHERE tenant_id = $1 AND budget = $2", tenant, name)
    await conn.execute("DELETE FROM budget_windows WHERE tenant_id = $1 AND budget = $2", tenant, name)


async def put_budget(
    conn: asyncpg.Connection, tenant: str, name: str, spec: dict[str, Any], *, actor: str, governance: bool
) -> Stored:
    """Create or replace budget ``name`` (in the caller's transaction). Changing its scope,
    target or period starts its windows afresh; changing a limit or the enforcement keeps
    what was spent."""
    previous = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM budgets WHERE tenant_id = $1 AND name = $2 FOR UPDATE", tenant, name
    )
    new = {"name": name, **spec}
    if previous is not None and _public(previous) == _public(new):
        return Stored((await _current(conn, tenant, [previous]))[0], False)
    if previous is None or any(previous[k] != new[k] for k in ("scope", "target", "period")):
        await _forget_windows(conn, tenant, name)
    row = await conn.fetchrow(
        "INSERT INTO budgets (tenant_id, name, scope, target, period, limit_usd, limit_tokens, enforcement)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant_id, name) DO UPDATE SET scope = excluded.scope,"
        " target = excluded.target, period = excluded.period, limit_usd = excluded.limit_usd,"
        " limit_tokens = excluded.limit_tokens, enforcement = excluded.enforcement, updated_at = now()"
        f" RETURNING {COLUMNS}",
        tenant, name, spec["scope"], spec["target"], spec["period"], spec["limit_usd"], spec["limit_tokens"],
        spec["enforcement"],
    )  # fmt: skip
    assert row is not None
    if governance:
        data = {"budget": name, **_public(row), "previous": _public(previous) if previous is not None else None}
        entry = audit_store.queued(tenant, datetime.now(UTC), actor, "budget.set", f"budget:{name}", data)
        await audit_store.enqueue(conn, [entry])
    return Stored((await _current(conn, tenant, [row]))[0], previous is None)


async def delete_budget(conn: asyncpg.Connection, tenant: str, name: str, *, actor: str, governance: bool) -> None:
    row = await conn.fetchrow(
        f"DELETE FROM budgets WHERE tenant_id = $1 AND name = $2 RETURNING {COLUMNS}", tenant, name
    )
    if row is None:
        raise NotFound(f"budget '{name}' not found")
    await _forget_windows(conn, tenant, name)
    if governance:
        entry = audit_store.queued(tenant, datetime.now(UTC), actor, "budget.deleted", f"budget:{name}",
                                   {"budget": name, **_public(row)})  # fmt: skip
        await audit_store.enqueue(conn, [entry])


async def run_budgets(
    conn: asyncpg.Connection, tenant: str, run_id: uuid.UUID, workflow: str, agents: Iterable[str]
) -> list[dict[str, Any]]:
    """The budgets covering a run, each with the window the run spends in now and what
    remains in it (agent budgets: those of agents the run has dispatched)."""
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM budgets WHERE tenant_id = $1 ORDER BY name", tenant)
    agents = set(agents)
    now = datetime.now(UTC)
    covering: list[tuple[Budget, str]] = []
    for r in rows:
        budget = budget_from_row(r)
        if budget.covers(workflow, None) or (budget.scope == "agent" and budget.target in agents):
            covering.append((budget, budget.window(run_id, now)))
    if not covering:
        return []
    out = []
    for window in await _windows(conn, tenant, covering):
        budget = window.budget
        out.append(
            {"name": budget.name, "scope": budget.scope, "target": budget.target, "period": budget.period,
             "enforcement": budget.enforcement,
             "limit_usd": None if budget.limit_usd is None else money(budget.limit_usd),
             "limit_tokens": budget.limit_tokens, **window.as_dict()}
        )  # fmt: skip
    return out
