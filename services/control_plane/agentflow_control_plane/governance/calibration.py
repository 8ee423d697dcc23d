"""Calibration: what LLM steps were estimated to use next to what they used.

Every dispatched LLM step attempt stores its estimate in ``step_estimates`` (uncorrected
tokens, corrected total and dollars); its successful result fills in the actual tokens and
dollars, when the primary model answered every call (a fallback model's usage says nothing
about the primary's). The per-(agent, model) correction factors of
:func:`agentflow_core.cost_model.learn_corrections` come from the last
:data:`WINDOW` observations and are applied to every later estimate; each control plane
re-reads them after :data:`CACHE_TTL_S`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg

from agentflow_core.cost_model import Correction, Observation, error_stats, learn_corrections

#: observations per (agent, model) the factors are learnt from
WINDOW = 50
CACHE_TTL_S = 5.0
#: observations read per tenant to learn from (WINDOW for up to this / WINDOW pairs)
HISTORY_LIMIT = 5000

Corrections = Mapping[tuple[str, str], Correction]

HISTORY_SQL = (
    "SELECT agent, route, raw_prompt_tokens, raw_completion_tokens, actual_prompt_tokens, actual_completion_tokens,"
    " est_tokens, est_cost_usd, actual_cost_usd FROM step_estimates"
    " WHERE tenant_id = $1 AND observed_at IS NOT NULL ORDER BY observed_at DESC, step_id LIMIT $2"
)


def _observations(rows: list[asyncpg.Record]) -> list[Observation]:
    """Oldest first, as ``learn_corrections`` wants them."""
    return [Observation(r[0], r[1], r[2], r[3], r[4], r[5], float(r[7]), float(r[8])) for r in reversed(rows)]


class CalibrationCache:
    def __init__(self, ttl_s: float = CACHE_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Corrections]] = {}

    async def get(self, conn: asyncpg.Connection, tenant: str) -> Corrections:
        entry = self._entries.get(tenant)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            return entry[1]
        rows = await conn.fetch(HISTORY_SQL, tenant, HISTORY_LIMIT)
        corrections = learn_corrections(_observations(rows), window=WINDOW)
        self._entries[tenant] = (now + self._ttl_s, corrections)
        return corrections

    async def get_many(self, conn: asyncpg.Connection, tenants: Iterable[str]) -> dict[str, Corrections]:
        return {tenant: await self.get(conn, tenant) for tenant in set(tenants)}


async def report(conn: asyncpg.Connection, tenant: str, last: int) -> dict[str, Any]:
    """Factors per (agent, model) and the relative errors of the last ``last`` estimates
    of each (dollars and tokens), next to the errors they would have had uncorrected."""
    rows = await conn.fetch(HISTORY_SQL, tenant, HISTORY_LIMIT)
    observations = _observations(rows)
    corrections = learn_corrections(observations, window=WINDOW)
    by_key: dict[tuple[str, str], list[asyncpg.Record]] = {}
    for r in rows:  # newest first
        kept = by_key.setdefault((r[0], r[1]), [])
        if len(kept) < last:
            kept.append(r)
    groups = []
    all_cost: list[tuple[float, float]] = []
    all_tokens: list[tuple[float, float]] = []
    for (agent, route), kept in sorted(by_key.items()):
        cost = [(float(r[7]), float(r[8])) for r in kept]
        tokens = [(float(r[6]), float(r[4] + r[5])) for r in kept]
        raw_tokens = [(float(r[2] + r[3]), float(r[4] + r[5])) for r in kept]
        all_cost += cost
        all_tokens += tokens
        c = corrections.get((agent, route), Correction())
        groups.append({
            "agent": agent, "model": route, "samples": c.samples,
            "prompt_factor": round(c.prompt, 4), "completion_factor": round(c.completion, 4),
            "cost_error": error_stats(cost), "token_error": error_stats(tokens),
            "uncorrected_token_error": error_stats(raw_tokens),
        })  # fmt: skip
    return {
        "window": WINDOW,
        "last": last,
        "cost_error": error_stats(all_cost),
        "token_error": error_stats(all_tokens),
        "groups": groups,
    }
