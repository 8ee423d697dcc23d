"""Auth failures in the audit chain, aggregated so a flood cannot flood the chain.

A refused request has no transaction to ride on, and an attacker can send thousands a
second, so failures are counted in memory per (tenant, status, reason, client) and written
every few seconds as one ``auth.failed`` entry per key with its count. A 403 (a valid
token without the needed role) goes to the token's tenant chain; a 401 (no tenant can be
trusted) goes to the reserved ``_system`` chain, which no token can name.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.tasks import stop_task
from agentflow_control_plane.db.session import pg_transaction
from agentflow_control_plane.engine.writes import clean_text
from agentflow_control_plane.governance import audit_store

log = logging.getLogger("agentflow.audit.auth")

SYSTEM_CHAIN = "_system"
#: distinct keys kept between flushes; beyond it failures are only counted under one key
MAX_KEYS = 1000


@dataclass(slots=True)
class _Tally:
    count: int
    first: datetime
    last: datetime
    path: str


class AuthFailureLog:
    def __init__(self, engine: AsyncEngine, *, interval_s: float = 5.0, enabled: bool = True) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._enabled = enabled
        self._tallies: dict[tuple[str, int, str, str], _Tally] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, *, tenant: str | None, status: int, reason: str, client: str, path: str) -> None:
        if not self._enabled:
            return
        now = datetime.now(UTC)
        key = (tenant or SYSTEM_CHAIN, status, clean_text(reason, 200), clean_text(client, 64))
        if key not in self._tallies and len(self._tallies) >= MAX_KEYS:
            key = (SYSTEM_CHAIN, status, "too many distinct failures to itemise", "*")
        tally = self._tallies.get(key)
        if tally is None:
            self._tallies[key] = _Tally(1, now, now, clean_text(path, 200))
        else:
            tally.count += 1
            tally.last = now
            tally.path = clean_text(path, 200)

    async def flush(self) -> int:
        """Write what was counted since the last flush. Returns how many entries."""
        tallies, self._tallies = self._tallies, {}
        if not tallies:
            return 0
        now = datetime.now(UTC)
        entries = []
        for (tenant, status, reason, client), t in sorted(tallies.items(), key=lambda kv: kv[0]):
            data = {"status": status, "reason": reason, "count": t.count, "path": t.path,
                    "first": t.first.isoformat(), "last": t.last.isoformat()}  # fmt: skip
            entries.append(audit_store.queued(tenant, now, f"client:{client}", "auth.failed", "api", data))
        try:
            async with pg_transaction(self._engine) as conn:
                await audit_store.enqueue(conn, entries)
        except Exception:
            # Keep the counts for the next round rather than lose them.
            for key, t in tallies.items():
                kept = self._tallies.setdefault(key, t)
                if kept is not t:
                    kept.count += t.count
            raise
        return len(entries)

    def start(self) -> None:
        if self._enabled:
            self._task = asyncio.create_task(self._loop(), name="audit-auth-failures")

    async def stop(self) -> None:
        await stop_task(self._task)
        try:
            await self.flush()
        except Exception as exc:
            log.warning("could not record %d auth failure tallies at shutdown (%s)", len(self._tallies), exc)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("recording auth failures failed (%s); retrying", exc)
