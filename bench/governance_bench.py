"""What the audit chain, the cost ledger and budgets cost, and how fast a chain verifies.

1. Engine throughput (the ``agentflow_bench`` throughput shape: runs of a linear echo FSM
   submitted by 32 clients, 2 workers) with governance on, then off (``AGENTFLOW_DEV_MODE``
   + ``AGENTFLOW_GOVERNANCE=off``), alternating ``--rounds`` times so drift on a shared
   machine hits both alike; the ratio of medians is the cost. A third mode adds a hard
   tenant budget (every engine transaction then locks the tenant's budget window).
2. Verification speed: a chain of ``--entries`` entries (the shape the engine writes:
   step.dispatched / step.completed) is written to a scratch database with COPY, then
   verified by the same code as ``GET /v1/audit/verify``; entries per second.

    .venv/bin/python -m bench.governance_bench                     # 3 rounds, 1,000,000 entries
    .venv/bin/python -m bench.governance_bench --rounds 1 --runs 300 --entries 100000   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from agentflow_core.builders import linear_fsm
from bench.agentflow_bench import Stack, _register, _span, _submit_many, _wait_all, machine


async def throughput(governance: bool, runs: int, steps: int, workers: int, budget: bool = False) -> float:
    extra = {} if governance else {"AGENTFLOW_DEV_MODE": "true", "AGENTFLOW_GOVERNANCE": "off"}
    stack = Stack(workers, extra)
    await stack.start()
    try:
        if budget:
            # A hard tenant budget: every engine transaction locks the tenant's day window
            # (echo steps are free, so nothing is reserved: this is the floor of the cost).
            headers = {"Authorization": f"Bearer {stack.token}"}
            async with httpx.AsyncClient(base_url=stack.url, headers=headers) as client:
                response = await client.put(
                    "/v1/budgets/bench", json={"scope": "tenant", "period": "day", "limit_usd": "1000"}
                )
                response.raise_for_status()
        await _register(stack, linear_fsm("warmup", steps))
        await _register(stack, linear_fsm("throughput", steps))
        await _submit_many(stack, "warmup", 100, 32)
        await _wait_all(stack, "warmup", 100, 120)
        await _submit_many(stack, "throughput", runs, 32)
        await _wait_all(stack, "throughput", runs, 600)
        rate = runs * steps / await _span(stack, "throughput")
        audits = await stack.db.fetchval("SELECT count(*) FROM audits")
        if governance and not audits:
            raise RuntimeError("governance on, but no audit entries were written")
        if not governance and audits:
            raise RuntimeError("governance off, but audit entries were written")
        return rate
    finally:
        await stack.stop()


async def verification(entries: int) -> dict[str, Any]:
    from agentflow_control_plane.db.migrate import upgrade
    from agentflow_control_plane.governance.audit_store import verify
    from agentflow_core.audit import GENESIS_HASH, link_all, prepare

    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    database = f"agentflow_verify_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{database}"')
    await conn.close()
    dsn = f"postgresql://postgres@127.0.0.1:5432/{database}"
    try:
        await asyncio.to_thread(upgrade, dsn)
        db = await asyncpg.connect(dsn)
        t0 = datetime(2026, 11, 21, tzinfo=UTC)
        run = str(uuid.uuid4())
        started = time.perf_counter()
        seq, head = 0, GENESIS_HASH
        batch = 50_000
        for first in range(0, entries, batch):
            prepared = []
            for i in range(first, min(first + batch, entries)):
                step = str(uuid.UUID(int=i))
                if i % 2 == 0:
                    action, data = (
                        "step.dispatched",
                        {
                            "run": run,
                            "step": step,
                            "seq": i,
                            "attempt": 1,
                            "agent": "a",
                            "queue": "default",
                            "envelope_hash": "sha256:" + "a" * 64,
                        },
                    )
                else:
                    action, data = "step.completed", {"run": run, "step": step, "attempt": 1, "status": "succeeded",
                                                      "result_hash": "sha256:" + "b" * 64,
                                                      "step_hash": "sha256:" + "c" * 64}  # fmt: skip
                prepared.append(prepare(tenant="bench", ts=t0 + timedelta(microseconds=i), actor="system:engine",
                                        action=action, resource=f"step:{step}", data=data))  # fmt: skip
            linked = link_all(seq, head, prepared)
            seq, head = linked[-1].seq, linked[-1].hash
            await db.copy_records_to_table(
                "audits",
                records=[
                    (
                        x.entry.tenant,
                        x.seq,
                        x.entry.ts,
                        x.entry.actor,
                        x.entry.action,
                        x.entry.resource,
                        json.dumps(x.entry.data),
                        x.prev_hash,
                        x.hash,
                    )
                    for x in linked
                ],
                columns=["tenant_id", "seq", "ts", "actor", "action", "resource", "data", "prev_hash", "hash"],
            )
        await db.execute("INSERT INTO audit_heads (tenant_id, seq, hash) VALUES ('bench', $1, $2)", seq, head)
        written = time.perf_counter() - started
        result = await verify(db, "bench")
        await db.close()
        if not result.ok or result.length != entries:
            raise RuntimeError(f"verification of the synthetic chain failed: {result}")
        return {
            "entries": entries,
            "write_s": round(written, 2),
            "verify_s": round(result.elapsed_s, 2),
            "verify_entries_per_s": round(entries / result.elapsed_s),
        }
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    on: list[float] = []
    off: list[float] = []
    budgeted: list[float] = []
    for _ in range(args.rounds):
        on.append(await throughput(True, args.runs, args.steps, args.workers))
        off.append(await throughput(False, args.runs, args.steps, args.workers))
        budgeted.append(await throughput(True, args.runs, args.steps, args.workers, budget=True))
    ratio = statistics.median(on) / statistics.median(off)
    return {
        "machine": machine(),
        "throughput_steps_per_s": {
            "governance_on": [round(x) for x in on],
            "governance_off": [round(x) for x in off],
            "on_with_budget": [round(x) for x in budgeted],
        },
        "median_on_over_off": round(ratio, 3),
        "governance_cost_pct": round((1 - ratio) * 100, 1),
        "budget_cost_pct": round((1 - statistics.median(budgeted) / statistics.median(on)) * 100, 1),
        "verification": await verification(args.entries),
        "config": vars(args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args()
    import uvloop

    print(json.dumps(uvloop.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
