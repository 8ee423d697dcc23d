"""AgentFlow benchmark harness: throughput, chain, latency and API, plus a Celery baseline.

Usage (from the repository root, after `make install`):

    .venv/bin/python -m bench.agentflow_bench                 # everything, own stack
    .venv/bin/python -m bench.agentflow_bench --skip-celery   # AgentFlow only
    .venv/bin/python -m bench.agentflow_bench --runs 200      # quicker

It starts its own stack (a fresh database on the local Postgres or an embedded one, its
own NATS prefix, one control plane and two workers as separate processes, exactly as
`agentflow up` does) and prints one JSON object. Timings come from the control plane's
own timestamps in Postgres, so every number counts durable, committed work:

- throughput: N runs of a 10-step echo FSM submitted concurrently (32 clients);
  steps / (last run finished - first run created).
- chain: one 200-step FSM run; 200 / (finished - created).
- latency: 500 sequential 1-step runs; per run, from the dispatch decision (step
  queued_at) to the decision that recorded its result (run finished_at), both stamped
  by the control plane in the transactions that commit them.
- api: POST /v1/runs latency seen by 32 concurrent clients (p50/p95/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx

from agentflow_core.builders import linear_fsm

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Stack:
    """One control plane and N workers on a fresh database and NATS prefix."""

    def __init__(self, workers: int, extra_env: dict[str, str] | None = None) -> None:
        self.workers = workers
        self.extra_env = extra_env or {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.embedded: list[Any] = []
        self.tag = secrets.token_hex(4)
        self.secret = secrets.token_hex(32)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logdir = Path(tempfile.mkdtemp(prefix="agentflow-bench-"))

    async def start(self) -> None:
        from agentflow_cli.embedded import EmbeddedNats, EmbeddedPostgres
        from agentflow_control_plane.db.migrate import upgrade

        (self.logdir / "logs").mkdir()
        if _listening(5432):
            admin = "postgresql://postgres@127.0.0.1:5432/postgres"
        else:
            pg = EmbeddedPostgres(self.logdir)
            admin = pg.start("postgres")
            self.embedded.append(pg)
        self.nats_url = "nats://127.0.0.1:4222"
        if not _listening(4222):
            server = EmbeddedNats(self.logdir)
            self.nats_url = server.start()
            self.embedded.append(server)
        import nats

        nc = await nats.connect(self.nats_url)
        self.nats_version = str(nc.connected_server_version)
        await nc.close()
        self.admin_dsn = admin
        self.database = f"agentflow_bench_{self.tag}"
        conn = await asyncpg.connect(admin)
        await conn.execute(f'CREATE DATABASE "{self.database}"')
        self.pg_version = await conn.fetchval("SHOW server_version")
        await conn.close()
        base, _, query = admin.partition("?")
        self.dsn = base.rsplit("/", 1)[0] + f"/{self.database}" + (f"?{query}" if query else "")
        await asyncio.to_thread(upgrade, self.dsn)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFLOW_")}
        env.update(
            AGENTFLOW_DATABASE_URL=self.dsn,
            AGENTFLOW_NATS_URL=self.nats_url,
            AGENTFLOW_NATS_PREFIX=f"b{self.tag}",
            AGENTFLOW_JWT_SECRET=self.secret,
            AGENTFLOW_PORT=str(self.port),
            AGENTFLOW_LOG_LEVEL="warning",
        )
        env.update(self.extra_env)
        launcher = [sys.executable, "-m", "agentflow_cli"]
        self._spawn([*launcher, "control-plane"], env, "control-plane")
        for i in range(self.workers):
            self._spawn([*launcher, "worker"], {**env, "AGENTFLOW_WORKER_NAME": f"bench-{i}"}, f"worker-{i}")
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"stack not ready; logs in {self.logdir}")
        from agentflow_control_plane.auth import issue_token

        self.token = issue_token(self.secret, tenant="bench", roles=["admin"], subject="bench", ttl_s=7200)
        self.db = await asyncpg.connect(self.dsn)

    def _spawn(self, args: list[str], env: dict[str, str], name: str) -> None:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        self.procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    async def stop(self) -> None:
        if hasattr(self, "db"):
            await self.db.close()
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if hasattr(self, "nats_url"):
            import nats

            nc = await nats.connect(self.nats_url)
            for stream in (f"B{self.tag.upper()}_STEPS", f"B{self.tag.upper()}_RESULTS"):
                try:
                    await nc.jetstream().delete_stream(stream)
                except Exception as exc:  # already gone
                    print(f"could not delete stream {stream}: {exc}", file=sys.stderr)
            await nc.close()
        if hasattr(self, "admin_dsn"):
            conn = await asyncpg.connect(self.admin_dsn)
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            await conn.close()
        for server in reversed(self.embedded):
            server.stop()


async def _submit(session: aiohttp.ClientSession, url: str, workflow: str, run_input: Any) -> tuple[str, float]:
    started = time.perf_counter()
    async with session.post(f"{url}/v1/runs", json={"workflow": workflow, "input": run_input}) as response:
        body = await response.read()
    elapsed = time.perf_counter() - started
    if response.status != 201:
        raise RuntimeError(f"POST /v1/runs -> {response.status}: {body[:500]!r}")
    return str(json.loads(body)["id"]), elapsed


def _session(stack: Stack, clients: int) -> aiohttp.ClientSession:
    # aiohttp rather than httpx for the load generator: it needs several times less CPU
    # per request, and on a 2-core machine the client competes with the server.
    return aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {stack.token}"},
        connector=aiohttp.TCPConnector(limit=clients),
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def _submit_many(stack: Stack, workflow: str, count: int, clients: int) -> list[float]:
    latencies: list[float] = []
    remaining = iter(range(count))
    async with _session(stack, clients) as session:

        async def one_client() -> None:
            for i in remaining:
                _, elapsed = await _submit(session, stack.url, workflow, {"i": i})
                latencies.append(elapsed)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


async def _wait_all(stack: Stack, workflow: str, count: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        done = await stack.db.fetchval(
            "SELECT count(*) FROM runs WHERE workflow_name = $1 AND status IN ('succeeded', 'failed')",
            workflow,
        )
        if done >= count:
            failed = await stack.db.fetchval(
                "SELECT count(*) FROM runs WHERE workflow_name = $1 AND status = 'failed'", workflow
            )
            if failed:
                raise RuntimeError(f"{failed} run(s) of {workflow} failed")
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{workflow}: runs not finished after {limit_s}s")


async def _poll_until_done(stack: Stack, run_id: uuid.UUID) -> None:
    # Polling is the point: the next sequential run starts as soon as this one is done.
    status = None
    while status not in ("succeeded", "failed"):
        status = await stack.db.fetchval("SELECT status FROM runs WHERE id = $1", run_id)
        if status not in ("succeeded", "failed"):
            await asyncio.sleep(0.0005)


async def _span(stack: Stack, workflow: str) -> float:
    row = await stack.db.fetchrow(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at)) AS s FROM runs WHERE workflow_name = $1",
        workflow,
    )
    return float(row["s"])


async def _register(stack: Stack, spec: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {stack.token}"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers) as client:
        response = await client.put(f"/v1/workflows/{spec['name']}", json=spec)
        response.raise_for_status()


async def bench_agentflow(args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(args.workers)
    await stack.start()
    try:
        await _register(stack, linear_fsm("throughput", args.steps))
        await _register(stack, linear_fsm("warmup", args.steps))
        await _register(stack, linear_fsm("chain", args.chain))
        await _register(stack, linear_fsm("single", 1))
        await _register(stack, linear_fsm("api", 1))
        parked = linear_fsm("parked", 1)
        parked["agents"]["a"]["queue"] = "parked"  # no worker consumes it
        await _register(stack, parked)

        await _submit_many(stack, "warmup", 100, 32)
        await _wait_all(stack, "warmup", 100, 120)

        throughput_api = await _submit_many(stack, "throughput", args.runs, 32)
        await _wait_all(stack, "throughput", args.runs, 600)
        span = await _span(stack, "throughput")
        throughput = args.runs * args.steps / span

        await _submit_many(stack, "chain", 1, 1)
        await _wait_all(stack, "chain", 1, 600)
        chain = args.chain / await _span(stack, "chain")

        async with _session(stack, 1) as session:
            for i in range(args.latency):
                run_id, _ = await _submit(session, stack.url, "single", i)
                await _poll_until_done(stack, uuid.UUID(run_id))
        rows = await stack.db.fetch(
            "SELECT extract(epoch FROM r.finished_at - s.queued_at) * 1000 AS ms "
            "FROM runs r JOIN steps s ON s.run_id = r.id WHERE r.workflow_name = 'single'"
        )
        round_trips = [float(r["ms"]) for r in rows]

        api_isolated = await _submit_many(stack, "parked", args.api_requests, 32)
        api = await _submit_many(stack, "api", args.api_requests, 32)
        await _wait_all(stack, "api", args.api_requests, 300)
        return {
            "throughput_steps_per_s": round(throughput, 1),
            "throughput_wall_s": round(span, 3),
            "chain_steps_per_s": round(chain, 1),
            "latency_ms": {q: round(percentile(round_trips, int(q[1:])), 2) for q in ("p50", "p95", "p99")},
            "api_post_runs_isolated_ms": {
                q: round(percentile(api_isolated, int(q[1:])) * 1000, 2) for q in ("p50", "p95", "p99")
            },
            "api_post_runs_ms": {q: round(percentile(api, int(q[1:])) * 1000, 2) for q in ("p50", "p95", "p99")},
            "api_post_runs_under_throughput_load_ms": {
                q: round(percentile(throughput_api, int(q[1:])) * 1000, 2) for q in ("p50", "p95", "p99")
            },
            "postgres_version": stack.pg_version,
            "nats_server_version": stack.nats_version,
            "config": {
                "runs": args.runs,
                "steps": args.steps,
                "chain": args.chain,
                "latency": args.latency,
                "api_requests": args.api_requests,
                "workers": args.workers,
                "clients": 32,
            },
        }
    finally:
        await stack.stop()


def bench_celery(args: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "bench.celery_baseline.run", "--runs", str(args.runs), "--steps", str(args.steps),
           "--chain", str(args.chain), "--latency", str(args.latency), "--workers", str(args.workers)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return {"error": f"celery baseline exited {result.returncode}"}
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in ("agentflow", "nats-py", "sqlalchemy", "asyncpg", "fastapi", "uvicorn")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--latency", type=int, default=500)
    parser.add_argument("--api-requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--out", type=Path, help="Also write the JSON summary to this file.")
    args = parser.parse_args()

    import uvloop

    summary: dict[str, Any] = {"machine": machine(), "agentflow": uvloop.run(bench_agentflow(args))}
    if not args.skip_celery:
        celery = bench_celery(args)
        summary["celery"] = celery
        if celery and "error" not in celery:
            ours = summary["agentflow"]
            summary["ratios"] = {
                "throughput_vs_celery": round(ours["throughput_steps_per_s"] / celery["throughput_steps_per_s"], 2),
                "chain_vs_celery": round(ours["chain_steps_per_s"] / celery["chain_steps_per_s"], 2),
            }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
