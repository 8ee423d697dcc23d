"""Worker cold start: from ``exec`` to consuming steps, for a worker without LLM agents.

Spawns ``python -m agentflow_cli worker`` against a running NATS (the machine's, or
``--nats``) ``--n`` times and measures the time until it logs that it is consuming its
queue (connected, streams and consumer ensured, services built, heartbeat sent). Also
times the bare imports, and checks that litellm was NOT imported (it costs seconds and is
loaded on the first LLM step only). Target: <= 500 ms.

Usage: ``.venv/bin/python -m bench.worker_startup_bench [--n 10] [--nats nats://127.0.0.1:4222]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time


def _spawn_until_ready(env: dict[str, str], timeout: float = 30.0) -> float:
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentflow_cli", "worker"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    try:
        while time.perf_counter() - began < timeout:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError(f"worker exited before it was ready (code {proc.wait()})")
            if "consuming queue" in line:
                return (time.perf_counter() - began) * 1000
        raise RuntimeError("worker not ready within the timeout")
    finally:
        proc.terminate()
        proc.wait(10)


def _import_ms(module: str) -> tuple[float, bool]:
    code = (
        "import time, sys; t = time.perf_counter(); import " + module + "; "
        "print((time.perf_counter() - t) * 1000, 'litellm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--out", help="append the JSON result to this file")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFLOW_")}
    env.update(
        AGENTFLOW_NATS_URL=args.nats,
        AGENTFLOW_NATS_PREFIX=f"bench{secrets.token_hex(3)}",
        AGENTFLOW_LOG_LEVEL="info",
        AGENTFLOW_WORKER_NAME="startup-bench",
    )
    _spawn_until_ready(env)  # warm the OS page cache and create the streams once
    ready = sorted(_spawn_until_ready(env) for _ in range(args.n))
    imports = sorted(_import_ms("agentflow_worker.worker")[0] for _ in range(5))
    _, litellm_loaded = _import_ms("agentflow_worker.agents.registry")
    result = {
        "bench": "worker_startup",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "n": args.n,
        "ready_ms_median": round(statistics.median(ready), 1),
        "ready_ms_p90": round(ready[int(len(ready) * 0.9) - 1 if len(ready) > 1 else 0], 1),
        "ready_ms_min": round(ready[0], 1),
        "import_worker_ms_median": round(statistics.median(imports), 1),
        "litellm_imported_at_start": litellm_loaded,
    }
    print(f"worker ready (exec -> consuming): median {result['ready_ms_median']} ms, "
          f"p90 {result['ready_ms_p90']} ms, min {result['ready_ms_min']} ms (target <= 500 ms)")  # fmt: skip
    print(f"import agentflow_worker.worker: median {result['import_worker_ms_median']} ms; "
          f"litellm imported at start: {litellm_loaded}")  # fmt: skip
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
