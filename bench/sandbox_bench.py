"""What the process sandbox costs per call: a trivial program run directly vs. sandboxed.

For each program (``python -I -c pass`` with the base interpreter, ``bash -c true``) it
times, sequentially, ``--n`` calls of:

* ``direct``: ``asyncio.create_subprocess_exec`` with pipes, wait, read;
* ``sandbox``: :meth:`ProcessSandbox.run` (cgroup or per-uid limits, prlimit, bwrap,
  setpriv; the same program);

plus ``code_executor``: the whole handler (``{"language": "python", "code": "pass"}``,
the code written into the sandbox as a file) — what a tool call pays.

Prints a table of p50/p95 in ms with the sandbox/direct ratio, then the summary as one
JSON line.

Usage: ``.venv/bin/python -m bench.sandbox_bench [--n 30] [--out FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agentflow_core.exec_profile import ExecProfileCompiler, TenantToolPolicy
from agentflow_core.tools import BUILTIN_TOOLS
from agentflow_worker.sandbox.base import SandboxRequest
from agentflow_worker.sandbox.process import ProcessSandbox
from agentflow_worker.tools.sandboxed import CodeExecutorHandler


def _stats(samples_ms: list[float]) -> dict[str, float]:
    samples_ms.sort()
    return {
        "p50_ms": round(statistics.median(samples_ms), 2),
        "p95_ms": round(samples_ms[min(len(samples_ms) - 1, int(len(samples_ms) * 0.95))], 2),
        "min_ms": round(samples_ms[0], 2),
    }


async def _time(call: Callable[[], Awaitable[Any]], n: int) -> dict[str, float]:
    await call()  # warm up (page cache, the sandbox's cgroup probe)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t0) * 1000)
    return _stats(samples)


async def _direct(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, _ = await proc.communicate()
    assert proc.returncode == 0, argv


async def measure(n: int) -> dict[str, Any]:
    sandbox = ProcessSandbox()
    problem = sandbox.available()
    if problem:
        raise SystemExit(f"process sandbox unavailable: {problem}")
    spec = BUILTIN_TOOLS["code_executor"]
    profile = ExecProfileCompiler().compile(spec, TenantToolPolicy())
    handler = CodeExecutorHandler({"process": sandbox})
    programs = {"python -I -c pass": [sandbox.python, "-I", "-c", "pass"], "bash -c true": ["/bin/bash", "-c", "true"]}
    results: dict[str, Any] = {}
    for label, argv in programs.items():

        async def direct_call(argv: list[str] = argv) -> None:
            await _direct(argv)

        async def sandboxed(argv: list[str] = argv) -> None:
            result = await sandbox.run(profile, SandboxRequest(argv=argv))
            assert result.exit_code == 0 and result.reason is None, result

        direct = await _time(direct_call, n)
        boxed = await _time(sandboxed, n)
        results[label] = {
            "direct": direct,
            "sandbox": boxed,
            "ratio_p50": round(boxed["p50_ms"] / direct["p50_ms"], 2),
            "overhead_p50_ms": round(boxed["p50_ms"] - direct["p50_ms"], 2),
        }

    async def code_executor() -> None:
        out = await handler.invoke(spec, profile, {"language": "python", "code": "pass"}, {})
        assert out["exit_code"] == 0, out

    results["code_executor python 'pass'"] = {"handler": await _time(code_executor, n)}
    return {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "n": n,
        "limits": sandbox.describe(),
        "results": results,
    }


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'program':<30} {'path':<14} {'p50 ms':>8} {'p95 ms':>8} {'ratio p50':>10}"]
    for label, row in summary["results"].items():
        for path in ("direct", "sandbox", "handler"):
            if path in row:
                ratio = f"{row['ratio_p50']:.2f}x" if path == "sandbox" else ""
                lines.append(
                    f"{label:<30} {path:<14} {row[path]['p50_ms']:>8.2f} {row[path]['p95_ms']:>8.2f} {ratio:>10}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="calls per measure")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args(argv)
    summary = asyncio.run(measure(args.n))
    print(f"pids limit: {summary['limits']['pids_limit']}; memory: {summary['limits']['memory_limit']}")
    print(table(summary))
    line = json.dumps(summary)
    print(line)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
