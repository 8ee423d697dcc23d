"""Reading the cost ledger: totals and breakdowns for a period.

Rows are written by the result path (one per LLM call and per tool call, see
``WriteSet.add_spend``). Dollars are ``numeric(20, 10)`` end to end and leave as decimal
strings, so totals are exact sums of the rows, never float approximations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import asyncpg

Period = Literal["today", "7d", "month"]
GroupBy = Literal["agent", "workflow", "model", "day", "run"]

#: SQL for each grouping key; tool calls are grouped under their tool id when by model
_KEYS: dict[str, str] = {
    "agent": "agent",
    "workflow": "workflow",
    "model": "CASE WHEN kind = 'llm' THEN name ELSE 'tool:' || name END",
    "day": "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "run": "run_id::text",
}


def period_bounds(period: Period, now: datetime | None = None) -> tuple[datetime, datetime]:
    """[start, end) of a period in UTC: today since midnight, the last 7 days, this month."""
    now = now or datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "today":
        return midnight, now
    if period == "7d":
        return now - timedelta(days=7), now
    return midnight.replace(day=1), now


def money(value: Decimal | int | None) -> str:
    """Exact decimal text (no exponent, no trailing zeros beyond the cents)."""
    d = Decimal(value or 0).quantize(Decimal("0.0000000001"))
    text = format(d, "f").rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True, slots=True)
class CostQuery:
    period: Period
    group_by: GroupBy
    workflow: str | None = None
    run: str | None = None


async def costs(conn: asyncpg.Connection, tenant: str, q: CostQuery) -> dict[str, Any]:
    start, end = period_bounds(q.period)
    where = "tenant_id = $1 AND at >= $2 AND at < $3"
    args: list[Any] = [tenant, start, end]
    if q.workflow:
        args.append(q.workflow)
        where += f" AND workflow = ${len(args)}"
    if q.run:
        args.append(q.run)
        where += f" AND run_id = ${len(args)}::uuid"
    key = _KEYS[q.group_by]
    rows = await conn.fetch(
        f"SELECT {key} AS key, sum(cost_usd), sum(prompt_tokens), sum(completion_tokens),"
        " count(*) FILTER (WHERE kind = 'llm'), count(*) FILTER (WHERE kind = 'tool')"
        f" FROM cost_ledger WHERE {where} GROUP BY 1 ORDER BY 2 DESC, 1",
        *args,
    )
    groups = [
        {
            "key": r[0],
            "cost_usd": money(r[1]),
            "prompt_tokens": int(r[2]),
            "completion_tokens": int(r[3]),
            "llm_calls": int(r[4]),
            "tool_calls": int(r[5]),
        }
        for r in rows
    ]
    total = {
        "cost_usd": money(sum((Decimal(r[1]) for r in rows), Decimal(0))),
        "prompt_tokens": sum(g["prompt_tokens"] for g in groups),
        "completion_tokens": sum(g["completion_tokens"] for g in groups),
        "llm_calls": sum(g["llm_calls"] for g in groups),
        "tool_calls": sum(g["tool_calls"] for g in groups),
    }
    return {
        "period": q.period,
        "from": start,
        "to": end,
        "group_by": q.group_by,
        "total": total,
        "groups": groups,
    }
