"""Budgets: what a tenant, a workflow, an agent or each run may spend, per run, day or month.

A budget is a limit in dollars and/or tokens (prompt + completion) over a *window*: the
run (``period: run``, one window per run), the UTC day or the UTC month. ``soft`` budgets
only warn (an audit entry, a metric, the window's ``warned`` flag) the first time the
ledger's spend in a window passes the limit. ``hard`` budgets gate twice:

* at run creation, the preflight estimate's *expected* cost is compared with what
  remains (limit - spent - reserved): more → 402 with the numbers, nothing is started;
* before each dispatch, the step attempt's *worst case* (``StepEstimate.max_cost_usd`` /
  ``max_tokens_total`` per attempt) is reserved in every hard window that covers it; the
  step envelope carries the amounts (``budget``) and the worker refuses a model call that
  could exceed them. A reservation that does not fit ends the run ``failed`` with
  ``budget_exceeded: ...``. The result settles the reservation: it is released and the
  reported usage is added to every covering window (hard and soft).

Windows are rows of ``budget_windows``; an engine transaction that involves a tenant with
budgets locks the windows it may touch up front, in key order (one upsert), so
reservations of concurrent transactions serialize on them and can never pass a limit
together, and two transactions never wait for each other in a cycle. Tenants without
budgets pay one cache lookup per transaction; transactions whose runs use only free agents
and report no usage skip the windows (see ``governance.costing``).

What a finished run's steps still hold (steps halted before they answered) is released
when the run finishes, and by :class:`ReservationSweeper` for anything left behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.tasks import stop_task
from agentflow_control_plane import metrics
from agentflow_control_plane.db.session import pg_transaction
from agentflow_control_plane.governance.ledger import money

log = logging.getLogger("agentflow.budgets")

SCOPES = ("tenant", "workflow", "agent", "run")
PERIODS = ("run", "day", "month")
ENFORCEMENTS = ("soft", "hard")
#: how long a control plane trusts its copy of a tenant's budgets (others' changes take this long)
CACHE_TTL_S = 2.0
FINAL = ("succeeded", "failed", "cancelled")
_TENTH_NANO = Decimal("0.0000000001")

#: (tenant, action, resource, data): how the book asks its transaction for an audit entry
AuditFn = Callable[[str, str, str, dict[str, Any]], None]


def usd(value: float | Decimal | int) -> Decimal:
    """Dollars as the exact decimal the tables store (10 places)."""
    return Decimal(str(value)).quantize(_TENTH_NANO)


def window_key(period: str, run_id: uuid.UUID, now: datetime) -> str:
    """The window a spend at ``now`` by ``run_id`` falls in."""
    if period == "run":
        return str(run_id)
    at = now.astimezone(UTC)
    return at.strftime("%Y-%m-%d") if period == "day" else at.strftime("%Y-%m")


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    scope: str
    target: str
    period: str
    limit_usd: Decimal | None
    limit_tokens: int | None
    enforcement: str

    @property
    def hard(self) -> bool:
        return self.enforcement == "hard"

    def covers(self, workflow: str, agent: str | None) -> bool:
        """Whether spend of ``agent`` in a run of ``workflow`` counts (``agent=None``: the
        run as a whole, which agent budgets cover only for their agent's steps)."""
        if self.scope == "workflow":
            return self.target == workflow
        if self.scope == "agent":
            return agent is not None and self.target == agent
        return True

    def window(self, run_id: uuid.UUID, now: datetime) -> str:
        return window_key(self.period, run_id, now)


def budget_from_row(row: Mapping[str, Any]) -> Budget:
    return Budget(
        name=row["name"],
        scope=row["scope"],
        target=row["target"],
        period=row["period"],
        limit_usd=row["limit_usd"],
        limit_tokens=row["limit_tokens"],
        enforcement=row["enforcement"],
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A budget that cannot take an amount: the numbers of a 402 or a ``budget_exceeded``."""

    budget: Budget
    window: str
    spent_usd: Decimal
    reserved_usd: Decimal
    requested_usd: Decimal
    spent_tokens: int
    reserved_tokens: int
    requested_tokens: int
    #: "usd" or "tokens": which limit it would pass
    limit: str

    def as_dict(self) -> dict[str, Any]:
        b = self.budget
        out: dict[str, Any] = {
            "budget": b.name, "scope": b.scope, "target": b.target, "period": b.period, "window": self.window,
            "enforcement": b.enforcement, "limit": self.limit,
        }  # fmt: skip
        if b.limit_usd is not None:
            remaining = b.limit_usd - self.spent_usd - self.reserved_usd
            out |= {"limit_usd": money(b.limit_usd), "spent_usd": money(self.spent_usd),
                    "reserved_usd": money(self.reserved_usd), "remaining_usd": money(remaining),
                    "requested_usd": money(self.requested_usd)}  # fmt: skip
        if b.limit_tokens is not None:
            out |= {"limit_tokens": b.limit_tokens, "spent_tokens": self.spent_tokens,
                    "reserved_tokens": self.reserved_tokens,
                    "remaining_tokens": b.limit_tokens - self.spent_tokens - self.reserved_tokens,
                    "requested_tokens": self.requested_tokens}  # fmt: skip
        return out

    def message(self) -> str:
        d = self.as_dict()
        if self.limit == "usd":
            need, left, unit = f"${d['requested_usd']}", f"${d['remaining_usd']} of ${d['limit_usd']}", ""
        else:
            need, left, unit = str(self.requested_tokens), f"{d['remaining_tokens']} of {d['limit_tokens']}", " tokens"
        b = self.budget
        return f"budget '{b.name}' ({b.scope}, window {self.window}) needs {need}{unit}, {left}{unit} remain"


@dataclass(slots=True)
class Window:
    budget: Budget
    key: str
    spent_usd: Decimal = Decimal(0)
    spent_tokens: int = 0
    reserved_usd: Decimal = Decimal(0)
    reserved_tokens: int = 0
    warned: bool = False
    dirty: bool = False

    def refusal(self, amount_usd: Decimal, amount_tokens: int) -> Refusal | None:
        """Why ``amount`` does not fit under the limit, or None when it does."""
        b = self.budget
        over_usd = b.limit_usd is not None and self.spent_usd + self.reserved_usd + amount_usd > b.limit_usd
        over_tokens = (
            b.limit_tokens is not None and self.spent_tokens + self.reserved_tokens + amount_tokens > b.limit_tokens
        )
        if not (over_usd or over_tokens):
            return None
        return Refusal(b, self.key, self.spent_usd, self.reserved_usd, amount_usd, self.spent_tokens,
                       self.reserved_tokens, amount_tokens, "usd" if over_usd else "tokens")  # fmt: skip

    def passed(self) -> bool:
        b = self.budget
        return (b.limit_usd is not None and self.spent_usd > b.limit_usd) or (
            b.limit_tokens is not None and self.spent_tokens > b.limit_tokens
        )

    def as_dict(self) -> dict[str, Any]:
        b = self.budget
        out: dict[str, Any] = {"window": self.key, "warned": self.warned,
                               "spent_usd": money(self.spent_usd), "reserved_usd": money(self.reserved_usd),
                               "spent_tokens": self.spent_tokens, "reserved_tokens": self.reserved_tokens}  # fmt: skip
        out["remaining_usd"] = None if b.limit_usd is None else money(b.limit_usd - self.spent_usd - self.reserved_usd)
        out["remaining_tokens"] = (
            None if b.limit_tokens is None else b.limit_tokens - self.spent_tokens - self.reserved_tokens
        )
        return out


@dataclass(frozen=True, slots=True)
class Reservation:
    step_id: uuid.UUID
    attempt: int
    tenant: str
    budget: str
    window: str
    usd: Decimal
    tokens: int
    run_id: uuid.UUID


class BudgetCache:
    """Each tenant's budgets, re-read after :data:`CACHE_TTL_S` (or at once after a change here)."""

    def __init__(self, ttl_s: float = CACHE_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, tuple[Budget, ...]]] = {}

    def invalidate(self, tenant: str) -> None:
        self._entries.pop(tenant, None)

    async def get_many(self, conn: asyncpg.Connection, tenants: Iterable[str]) -> dict[str, tuple[Budget, ...]]:
        now = time.monotonic()
        out: dict[str, tuple[Budget, ...]] = {}
        missing: list[str] = []
        for tenant in set(tenants):
            entry = self._entries.get(tenant)
            if entry is not None and entry[0] > now:
                out[tenant] = entry[1]
            else:
                missing.append(tenant)
        if missing:
            rows = await conn.fetch(
                "SELECT tenant_id, name, scope, target, period, limit_usd, limit_tokens, enforcement FROM budgets"
                " WHERE tenant_id = ANY($1::text[]) ORDER BY tenant_id, name",
                missing,
            )
            found: dict[str, list[Budget]] = {t: [] for t in missing}
            for row in rows:
                found[row["tenant_id"]].append(budget_from_row(row))
            for tenant, budgets in found.items():
                out[tenant] = tuple(budgets)
                self._entries[tenant] = (now + self._ttl_s, tuple(budgets))
        return out


RESERVATION_SQL = (
    'SELECT step_id, attempt, tenant_id, budget, "window", usd, tokens, run_id FROM budget_reservations'
    " WHERE run_id = ANY($1::uuid[])"
)
# ON CONFLICT DO UPDATE locks rows that exist; new rows are locked by their insert.
# Keys arrive sorted, so concurrent transactions take the locks in the same order.
LOCK_WINDOWS_SQL = (
    'INSERT INTO budget_windows (tenant_id, budget, "window") SELECT * FROM unnest($1::text[], $2::text[], $3::text[])'
    ' ON CONFLICT (tenant_id, budget, "window") DO UPDATE SET warned = budget_windows.warned'
    ' RETURNING tenant_id, budget, "window", spent_usd, spent_tokens, reserved_usd, reserved_tokens, warned'
)


@dataclass(slots=True)
class BudgetBook:
    """The budget windows of one engine transaction, locked, and what it changes in them."""

    budgets: dict[str, tuple[Budget, ...]]
    windows: dict[tuple[str, str, str], Window]
    #: reservations of the transaction's runs, by (step, attempt)
    held: dict[tuple[uuid.UUID, int], list[Reservation]]
    now: datetime
    audit: AuditFn = lambda *_args: None
    new_reservations: list[Reservation] = field(default_factory=list)
    released: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    #: per-attempt amounts of settled reservations, for the step's next attempt
    amounts: dict[uuid.UUID, tuple[Decimal, int]] = field(default_factory=dict)

    @classmethod
    async def open(
        cls, conn: asyncpg.Connection, cache: BudgetCache, runs: Sequence[tuple[str, uuid.UUID]], now: datetime
    ) -> BudgetBook | None:
        """Lock the windows that runs ``(tenant, run id)`` may touch; None when no tenant
        among them has a budget (the common case: nothing else happens)."""
        if not runs:
            return None
        budgets = {t: b for t, b in (await cache.get_many(conn, {t for t, _ in runs})).items() if b}
        if not budgets:
            return None
        runs = [(t, r) for t, r in runs if t in budgets]
        by_name = {(t, b.name): b for t, bs in budgets.items() for b in bs}
        held: dict[tuple[uuid.UUID, int], list[Reservation]] = {}
        keys: set[tuple[str, str, str]] = set()
        for row in await conn.fetch(RESERVATION_SQL, [r for _, r in runs]):
            res = Reservation(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7])
            held.setdefault((res.step_id, res.attempt), []).append(res)
            if (res.tenant, res.budget) in by_name:  # else: a deleted budget's, released with nothing to give back
                keys.add((res.tenant, res.budget, res.window))
        for tenant, run_id in runs:
            for budget in budgets[tenant]:
                keys.add((tenant, budget.name, budget.window(run_id, now)))
        ordered = sorted(keys)
        rows = await conn.fetch(LOCK_WINDOWS_SQL, *(list(col) for col in zip(*ordered, strict=True)))
        windows = {(r[0], r[1], r[2]): Window(by_name[(r[0], r[1])], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows}
        return cls(budgets, windows, held, now)

    def _covering(self, tenant: str, run_id: uuid.UUID, workflow: str, agent: str | None) -> list[Window]:
        out = []
        for budget in self.budgets.get(tenant, ()):
            if budget.covers(workflow, agent):
                window = self.windows.get((tenant, budget.name, budget.window(run_id, self.now)))
                if window is not None:
                    out.append(window)
        return out

    def reserve(
        self,
        items: Sequence[tuple[uuid.UUID, int, str, Decimal, int]],
        *,
        tenant: str,
        run_id: uuid.UUID,
        workflow: str,
    ) -> Refusal | None:
        """Reserve ``(step, attempt, agent, usd, tokens)`` for each item in every hard window
        covering it, all or nothing. Free items reserve nothing."""
        made: list[tuple[Window, Reservation]] = []
        for step_id, attempt, agent, amount_usd, amount_tokens in items:
            if amount_usd <= 0 and amount_tokens <= 0:
                continue
            for window in self._covering(tenant, run_id, workflow, agent):
                if not window.budget.hard:
                    continue
                refusal = window.refusal(amount_usd, amount_tokens)
                if refusal is not None:
                    for w, res in made:  # undo this call's earlier reservations
                        w.reserved_usd -= res.usd
                        w.reserved_tokens -= res.tokens
                        self.new_reservations.remove(res)
                    return refusal
                window.reserved_usd += amount_usd
                window.reserved_tokens += amount_tokens
                window.dirty = True
                res = Reservation(step_id, attempt, tenant, window.budget.name, window.key, amount_usd,
                                  amount_tokens, run_id)  # fmt: skip
                self.new_reservations.append(res)
                made.append((window, res))
        return None

    def _release(self, key: tuple[uuid.UUID, int]) -> None:
        for res in self.held.pop(key, ()):
            window = self.windows.get((res.tenant, res.budget, res.window))
            if window is not None:
                window.reserved_usd -= res.usd
                window.reserved_tokens -= res.tokens
                window.dirty = True
            self.amounts[res.step_id] = (res.usd, res.tokens)
        if key not in self.released:
            self.released.append(key)

    def settle(
        self,
        *,
        tenant: str,
        run_id: uuid.UUID,
        workflow: str,
        agent: str,
        step_id: uuid.UUID,
        attempt: int,
        spent_usd: Decimal,
        spent_tokens: int,
    ) -> None:
        """A result arrived: release its attempt's reservation and count what it spent."""
        self._release((step_id, attempt))
        if spent_usd <= 0 and spent_tokens <= 0:
            return
        for window in self._covering(tenant, run_id, workflow, agent):
            window.spent_usd += spent_usd
            window.spent_tokens += spent_tokens
            window.dirty = True
            if window.passed() and not window.warned:
                window.warned = True
                b = window.budget
                event = "warning" if not b.hard else "overspent"
                metrics.BUDGET_EVENTS.labels(tenant, event).inc()
                self.audit(tenant, f"budget.{event}", f"budget:{b.name}",
                           {"budget": b.name, "window": window.key, "run": str(run_id),
                            **_limits(window)})  # fmt: skip

    def retry_amount(self, step_id: uuid.UUID, attempt: int) -> tuple[Decimal, int] | None:
        """What the step's previous attempt reserved (the next one needs as much)."""
        held = self.held.get((step_id, attempt))
        if held:
            return held[0].usd, held[0].tokens
        return self.amounts.get(step_id)

    def release_run(self, run_id: uuid.UUID) -> None:
        """The run finished: whatever its steps still hold goes back (see the module docs)."""
        for key in [k for k, held in self.held.items() if held and held[0].run_id == run_id]:
            self._release(key)
        kept = [r for r in self.new_reservations if r.run_id != run_id]
        for res in self.new_reservations:
            if res.run_id == run_id:
                window = self.windows[(res.tenant, res.budget, res.window)]
                window.reserved_usd -= res.usd
                window.reserved_tokens -= res.tokens
        self.new_reservations = kept

    def remaining(self, tenant: str, run_id: uuid.UUID, workflow: str) -> list[tuple[Window, bool]]:
        """Windows covering a run (``True``: an agent budget, for that agent's steps only)."""
        out = [(w, False) for w in self._covering(tenant, run_id, workflow, None)]
        for budget in self.budgets.get(tenant, ()):
            if budget.scope == "agent":
                window = self.windows.get((tenant, budget.name, budget.window(run_id, self.now)))
                if window is not None:
                    out.append((window, True))
        return out

    # --- what the transaction's statement writes (see WriteSet.flush) -------------------

    def window_rows(self) -> list[tuple[Any, ...]]:
        return [
            (t, b, k, str(w.spent_usd), w.spent_tokens, str(w.reserved_usd), w.reserved_tokens, w.warned)
            for (t, b, k), w in self.windows.items()
            if w.dirty
        ]

    def reservation_rows(self) -> list[tuple[Any, ...]]:
        return [
            (r.step_id, r.attempt, r.tenant, r.budget, r.window, str(r.usd), r.tokens, r.run_id)
            for r in self.new_reservations
        ]


WINDOW_CASTS = ("text[]", "text[]", "text[]", "numeric[]", "bigint[]", "numeric[]", "bigint[]", "bool[]")
RESERVATION_CASTS = ("uuid[]", "int[]", "text[]", "text[]", "text[]", "numeric[]", "bigint[]", "uuid[]")


def _limits(window: Window) -> dict[str, Any]:
    b = window.budget
    out: dict[str, Any] = {"enforcement": b.enforcement}
    if b.limit_usd is not None:
        out |= {"limit_usd": money(b.limit_usd), "spent_usd": money(window.spent_usd)}
    if b.limit_tokens is not None:
        out |= {"limit_tokens": b.limit_tokens, "spent_tokens": window.spent_tokens}
    return out


def admission_refusal(
    book: BudgetBook, *, tenant: str, run_id: uuid.UUID, workflow: str, estimate: Mapping[str, Any]
) -> tuple[Refusal | None, list[Refusal]]:
    """Compare a new run's expected spend with what its budgets have left: the hard
    refusal (if any) and the soft budgets it would pass (warned about, not refused)."""
    steps = estimate.get("steps") or []
    hard: Refusal | None = None
    soft: list[Refusal] = []
    for window, per_agent in book.remaining(tenant, run_id, workflow):
        chosen = [s for s in steps if s.get("agent") == window.budget.target] if per_agent else steps
        if per_agent and not chosen:
            continue
        amount_usd = usd(sum(float(s.get("cost_usd") or 0) for s in chosen))
        amount_tokens = sum(int(s.get("prompt_tokens") or 0) + int(s.get("completion_tokens") or 0) for s in chosen)
        refusal = window.refusal(amount_usd, amount_tokens)
        if refusal is None:
            continue
        if window.budget.hard:
            hard = hard or refusal
        else:
            soft.append(refusal)
    return hard, soft


# --- the sweeper ----------------------------------------------------------------------------

SWEEP_CANDIDATES_SQL = (
    'SELECT DISTINCT r.tenant_id, r.budget, r."window" FROM budget_reservations r JOIN runs ON runs.id = r.run_id'
    " WHERE runs.status IN ('succeeded', 'failed', 'cancelled') ORDER BY 1, 2, 3 LIMIT 500"
)
SWEEP_LOCK_SQL = (
    'SELECT tenant_id FROM budget_windows WHERE (tenant_id, budget, "window") IN'
    " (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))"
    ' ORDER BY tenant_id, budget, "window" FOR UPDATE'
)
SWEEP_SQL = (
    "WITH gone AS (DELETE FROM budget_reservations r USING runs WHERE runs.id = r.run_id"
    " AND runs.status IN ('succeeded', 'failed', 'cancelled')"
    ' AND (r.tenant_id, r.budget, r."window") IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))'
    ' RETURNING r.tenant_id, r.budget, r."window", r.usd, r.tokens),'
    ' sums AS (SELECT tenant_id, budget, "window", sum(usd) AS usd, sum(tokens) AS tokens FROM gone GROUP BY 1, 2, 3)'
    " UPDATE budget_windows w SET reserved_usd = w.reserved_usd - s.usd, reserved_tokens = w.reserved_tokens - s.tokens"
    ' FROM sums s WHERE w.tenant_id = s.tenant_id AND w.budget = s.budget AND w."window" = s."window"'
)


async def release_finished(engine: AsyncEngine) -> int:
    """Release reservations still held by finished runs. Returns how many windows."""
    async with pg_transaction(engine) as conn:
        keys = [tuple(r) for r in await conn.fetch(SWEEP_CANDIDATES_SQL)]
        if not keys:
            return 0
        columns = [list(col) for col in zip(*keys, strict=True)]
        # Windows first, in key order, like every engine transaction: no lock cycles.
        await conn.fetch(SWEEP_LOCK_SQL, *columns)
        await conn.execute(SWEEP_SQL, *columns)
    return len(keys)


class ReservationSweeper:
    def __init__(self, engine: AsyncEngine, *, interval_s: float = 1.0) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="budget-sweeper")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _loop(self) -> None:
        while True:
            try:
                await release_finished(self._engine)
            except Exception as exc:
                log.warning("releasing finished runs' budget reservations failed (%s); retrying", exc)
            await asyncio.sleep(self._interval_s)
