"""Celery + Redis baseline for the AgentFlow benchmark harness.

Usage (from the repository root)::

    .venv/bin/python -m bench.celery_baseline.run [--runs 1000] [--steps 10] \
        [--chain 200] [--latency 500] [--workers 2] [--redis-url URL] \
        [--private-redis] [--repeat 1] [--worker-loglevel WARNING]

Prints exactly one JSON object on stdout; every log line (ours, the workers',
a private redis-server's) goes to stderr.

What is measured (the same shapes as our own engine's benchmark):

* throughput: ``--runs`` chains of ``--steps`` ``echo`` tasks each (a chain
  passes every task's return value to the next task), all submitted from one
  client thread back to back, without waiting in between.  Wall time runs from
  the first ``apply_async`` until the result of the last chain is in the
  client; ``throughput_steps_per_s = runs * steps / wall``.  The chain
  signatures are built before the clock starts, ``apply_async`` is inside it.
* chain: one chain of ``--chain`` echo tasks -> ``chain / wall`` sequential
  steps per second (``apply_async`` + ``AsyncResult.get`` inside the clock).
* latency: ``--latency`` sequential single-task round trips
  (``echo.apply_async`` + ``AsyncResult.get``), reported as p50/p95/p99 in ms.
  ``--latency 0`` skips it and reports ``latency_ms: null``.

Setup and fairness choices:

* Workers: ``--workers`` (default 2) separate ``celery worker`` processes,
  each ``-P solo --concurrency 1`` (one task at a time, no pool process), with
  ``--without-gossip --without-mingle --without-heartbeat`` (cluster-event
  chatter that has no part in executing tasks and that is commonly turned off
  on Redis deployments), ``-Q bench`` and ``--loglevel WARNING`` (INFO adds
  two log lines per task; ``--worker-loglevel INFO`` measured within noise).  Celery settings are in
  ``tasks.py``: a default-like production configuration (JSON, acks early,
  prefetch multiplier 4, every task result stored in Redis, results expire
  after 10 minutes).  Both are copied into ``config`` in the JSON output.
* Redis is broker and result backend.  The DB in the URL (default 15) is
  flushed before and after the run; DB 0 of an external server is refused.
  If nothing answers at the URL and its host is loopback, a private
  ``redis-server`` (persistence off, bound to 127.0.0.1 on a free port) is
  started and stopped again; ``--private-redis`` forces that.
* Readiness: the workers must answer ``app.control.ping`` (the remote-control
  consumer starts after the task consumer) before anything is timed.  Then a
  warmup (a batch of chains plus some round trips) primes imports,
  connections and Redis.
* Result fetching uses Celery's native Redis path, which is pub/sub, not
  polling: ``ResultSet.join_native`` for the throughput batch (one SUBSCRIBE
  per final task, plus one MGET pass for those already finished) and
  ``AsyncResult.get`` for the chain and the round trips.  The client wakes up
  as soon as the result is published, so there is no polling interval to
  tune.  As a check, ``details.throughput.result_lag_ms`` is the time from the
  newest ``date_done`` a worker wrote to the moment the client had every
  result; a small value means result fetching does not dominate.
* Every result is checked against its input; a wrong value fails the run.
  ``details.tasks_per_worker_incl_warmup`` shows both workers did work.
* Payloads are tiny JSON values: ``{"run": i}`` per throughput chain,
  ``{"chain": n}`` for the long chain, an int per round trip.
* Noise: on a 2-core VM the client, Redis and both workers compete for the
  CPUs (the workers are the bottleneck, ~1.4 ms CPU per task each), and
  single runs vary by about +-15 %.  ``--repeat N`` repeats the throughput
  and chain phases and reports the (lower) median sample, with all samples
  in ``details``.
* Workers are stopped with SIGTERM (warm shutdown), then SIGKILL after
  ``--stop-timeout`` seconds, also after errors, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from bench.celery_baseline import tasks
from bench.celery_baseline.tasks import DEFAULT_REDIS_URL, QUEUE

log = logging.getLogger("celery_baseline")

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class BenchError(RuntimeError):
    """A failure that is reported as one clear message, without a traceback."""


# --------------------------------------------------------------------------- redis


def _redis_db(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path else 0


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"127.0.0.1:{port}"
    if parts.password:
        netloc = f":{parts.password}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f":***@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(url: str, force_private: bool) -> Iterator[tuple[str, bool]]:
    """Yield ``(url, private)``: the given server, or a private one if needed."""
    host = urlsplit(url).hostname or "127.0.0.1"
    if not force_private:
        if _ping(url):
            yield url, False
            return
        if host not in LOOPBACK_HOSTS:
            raise BenchError(f"no Redis answers at {_redacted(url)}")
        log.warning("no Redis at %s; starting a private redis-server", _redacted(url))
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError(
            "redis-server not found on PATH and no Redis is reachable; "
            "install it (Debian: apt-get install -y redis-server) or pass --redis-url"
        )
    port = _free_port()
    private_url = _with_port(url, port)
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port)]
    cmd += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
    if password := urlsplit(url).password:
        cmd += ["--requirepass", password]
    log.info("starting %s on 127.0.0.1:%d", binary, port)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr)
    try:
        deadline = time.monotonic() + 10
        while not _ping(private_url):
            if proc.poll() is not None:
                raise BenchError(f"redis-server exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise BenchError("private redis-server did not answer within 10 s")
            time.sleep(0.05)
        yield private_url, True
    finally:
        _stop_processes([proc], timeout=5)


# --------------------------------------------------------------------------- workers


def _worker_command(index: int, loglevel: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.celery_baseline.tasks",
        "worker",
        "-P",
        "solo",
        "--concurrency",
        "1",
        "-n",
        f"bench-w{index}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-Q",
        QUEUE,
        "--loglevel",
        loglevel,
    ]


def _stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every process, wait up to ``timeout`` s in total, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def celery_workers(
    count: int, redis_url: str, stop_timeout: float, loglevel: str = "WARNING"
) -> Iterator[tuple[list[list[str]], list[subprocess.Popen[bytes]]]]:
    env = dict(os.environ)
    env["BENCH_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    commands = [_worker_command(i + 1, loglevel) for i in range(count)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd in commands:
            # stdout -> our stderr: the worker banner must not reach our stdout.
            # Own session: a Ctrl-C at the terminal reaches only us; we stop them.
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=sys.stderr,
                    stderr=sys.stderr,
                    start_new_session=True,
                )
            )
            log.info("started worker pid %d: %s", procs[-1].pid, " ".join(cmd[1:]))
        yield commands, procs
    finally:
        log.info("stopping %d worker(s)", len(procs))
        _stop_processes(procs, stop_timeout)


def wait_until_ready(app: Any, names: set[str], procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while True:
        replies = app.control.ping(timeout=0.5) or []
        seen = {name.split("@", 1)[0] for reply in replies for name in reply}
        if names <= seen:
            log.info("workers ready: %s", ", ".join(sorted(seen & names)))
            return
        if any(proc.poll() is not None for proc in procs):
            raise BenchError("a worker process exited during startup (see stderr)")
        if time.monotonic() > deadline:
            raise BenchError(f"workers not ready after {timeout:.0f} s; answered: {sorted(seen)}")


# --------------------------------------------------------------------------- measurements


def _make_chain(echo: Any, payload: Any, length: int) -> Any:
    from celery import chain

    return chain(echo.s(payload), *(echo.s() for _ in range(length - 1)))


def _latest_date_done(results: list[Any]) -> float | None:
    latest: float | None = None
    for result in results:
        done = (getattr(result, "_cache", None) or {}).get("date_done")
        if isinstance(done, str):
            done = datetime.fromisoformat(done)
        if isinstance(done, datetime):
            ts = done.timestamp()
            latest = ts if latest is None else max(latest, ts)
    return latest


def measure_throughput(echo: Any, runs: int, steps: int, timeout: float) -> dict[str, Any]:
    from celery.result import ResultSet

    payloads = [{"run": i} for i in range(runs)]
    chains = [_make_chain(echo, p, steps) for p in payloads]
    t0 = time.perf_counter()
    results = [c.apply_async() for c in chains]
    t_submitted = time.perf_counter()
    values = ResultSet(results).join_native(timeout=timeout, propagate=True)
    t1 = time.perf_counter()
    wall_end = time.time()
    if values != payloads:
        bad = sum(1 for v, p in zip(values, payloads, strict=True) if v != p)
        raise BenchError(f"throughput: {bad} of {runs} chains returned a wrong value")
    wall = t1 - t0
    latest_done = _latest_date_done(results)
    return {
        "runs": runs,
        "steps_per_run": steps,
        "steps": runs * steps,
        "wall_s": round(wall, 4),
        "submit_s": round(t_submitted - t0, 4),
        "result_lag_ms": (round((wall_end - latest_done) * 1000, 2) if latest_done is not None else None),
        "steps_per_s": runs * steps / wall,
    }


def measure_chain(echo: Any, length: int, timeout: float) -> dict[str, Any]:
    payload = {"chain": length}
    sig = _make_chain(echo, payload, length)
    t0 = time.perf_counter()
    value = sig.apply_async().get(timeout=timeout)
    wall = time.perf_counter() - t0
    if value != payload:
        raise BenchError(f"chain: got {value!r}, expected {payload!r}")
    return {"steps": length, "wall_s": round(wall, 4), "steps_per_s": length / wall}


def measure_latency(echo: Any, count: int, timeout: float) -> dict[str, Any]:
    samples: list[float] = []
    for i in range(count):
        t0 = time.perf_counter()
        value = echo.apply_async((i,)).get(timeout=timeout)
        samples.append((time.perf_counter() - t0) * 1000)
        if value != i:
            raise BenchError(f"latency: got {value!r}, expected {i!r}")
    if len(samples) >= 2:
        q = statistics.quantiles(samples, n=100, method="inclusive")
        p50, p95, p99 = q[49], q[94], q[98]
    else:
        p50 = p95 = p99 = samples[0]
    return {
        "count": count,
        "p50": round(p50, 3),
        "p95": round(p95, 3),
        "p99": round(p99, 3),
        "mean": round(statistics.fmean(samples), 3),
        "max": round(max(samples), 3),
    }


def _median_sample(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the (lower) median steps/s, plus every sample's steps/s."""
    ranked = sorted(samples, key=lambda s: s["steps_per_s"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["samples_steps_per_s"] = [round(s["steps_per_s"], 1) for s in samples]
    return median


def per_worker_counts(app: Any) -> dict[str, int]:
    stats = app.control.inspect(timeout=1.0).stats() or {}
    return {name: int(sum((info.get("total") or {}).values())) for name, info in sorted(stats.items())}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.celery_baseline.run",
        description="Celery + Redis baseline; prints one JSON object on stdout.",
    )
    parser.add_argument("--runs", type=int, default=1000, help="chains in the throughput batch")
    parser.add_argument("--steps", type=int, default=10, help="echo tasks per throughput chain")
    parser.add_argument("--chain", type=int, default=200, help="length of the sequential chain")
    parser.add_argument("--latency", type=int, default=500, help="round trips (0 = skip)")
    parser.add_argument("--workers", type=int, default=2, help="celery worker processes")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="broker and result backend; its DB is flushed (default: %(default)s)",
    )
    parser.add_argument(
        "--private-redis",
        action="store_true",
        help="always start a private redis-server on a free loopback port",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="repeat throughput and chain; report the (lower) median sample",
    )
    parser.add_argument(
        "--worker-loglevel",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="worker --loglevel; INFO logs two lines per task (default: %(default)s)",
    )
    parser.add_argument("--warmup-runs", type=int, default=50, help="chains in the warmup batch")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-phase result timeout, s")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="worker startup, s")
    parser.add_argument("--stop-timeout", type=float, default=10.0, help="SIGTERM grace, s")
    args = parser.parse_args(argv)
    for name in ("runs", "steps", "chain", "workers", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.latency < 0 or args.warmup_runs < 0:
        parser.error("--latency and --warmup-runs must be >= 0")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import celery

    with redis_server(args.redis_url, args.private_redis) as (url, private):
        db = _redis_db(url)
        if db == 0 and not private:
            raise BenchError("refusing to flush DB 0 of a shared Redis; use a dedicated DB")
        admin = redis.Redis.from_url(url)
        redis_version = str(admin.info("server")["redis_version"])
        admin.flushdb()
        log.info("redis %s at %s (db %d flushed)", redis_version, _redacted(url), db)

        # The workers read BENCH_REDIS_URL when they import tasks.py; this
        # process imported it already, so point its (still lazy) app there too.
        os.environ["BENCH_REDIS_URL"] = url
        app, echo = tasks.app, tasks.echo
        app.conf.update(broker_url=url, result_backend=url)
        try:
            with celery_workers(args.workers, url, args.stop_timeout, args.worker_loglevel) as (
                commands,
                procs,
            ):
                names = {f"bench-w{i + 1}" for i in range(args.workers)}
                wait_until_ready(app, names, procs, args.ready_timeout)

                if args.warmup_runs:
                    log.info("warmup: %d chains x %d steps", args.warmup_runs, args.steps)
                    measure_throughput(echo, args.warmup_runs, args.steps, args.timeout)
                    measure_latency(echo, 20, args.timeout)

                samples = []
                for i in range(args.repeat):
                    log.info("throughput #%d: %d chains x %d steps", i + 1, args.runs, args.steps)
                    samples.append(measure_throughput(echo, args.runs, args.steps, args.timeout))
                    log.info("throughput: %.1f steps/s", samples[-1]["steps_per_s"])
                throughput = _median_sample(samples)

                samples = []
                for i in range(args.repeat):
                    log.info("chain #%d: %d sequential steps", i + 1, args.chain)
                    samples.append(measure_chain(echo, args.chain, args.timeout))
                    log.info("chain: %.1f steps/s", samples[-1]["steps_per_s"])
                chain = _median_sample(samples)

                latency = None
                if args.latency:
                    log.info("latency: %d round trips", args.latency)
                    latency = measure_latency(echo, args.latency, args.timeout)
                    log.info("latency: p50 %.2f ms, p99 %.2f ms", latency["p50"], latency["p99"])

                tasks_per_worker = per_worker_counts(app)
        finally:
            with contextlib.suppress(Exception):
                app.close()
            with contextlib.suppress(redis.RedisError):
                admin.flushdb()
            admin.close()

    worker_cmd = ["python", *commands[0][1:]]
    return {
        "system": "celery",
        "celery_version": celery.__version__,
        "redis_version": redis_version,
        "throughput_steps_per_s": round(throughput["steps_per_s"], 1),
        "chain_steps_per_s": round(chain["steps_per_s"], 1),
        "latency_ms": ({k: latency[k] for k in ("p50", "p95", "p99")} if latency is not None else None),
        "config": {
            "runs": args.runs,
            "steps": args.steps,
            "chain": args.chain,
            "latency_round_trips": args.latency,
            "warmup_runs": args.warmup_runs,
            "repeat": args.repeat,
            "worker_loglevel": args.worker_loglevel,
            "workers": args.workers,
            "worker_pool": "solo",
            "worker_command": " ".join(worker_cmd),
            "broker": "redis",
            "result_backend": "redis",
            "redis_url": _redacted(url),
            "redis_private": private,
            "celery_settings": tasks.SETTINGS,
            "result_fetch": "ResultSet.join_native (throughput), AsyncResult.get (chain, "
            "latency); Redis pub/sub, no polling",
            "submission": "single client thread, apply_async back to back",
            "payload": '{"run": i} (throughput), {"chain": n} (chain), int (latency)',
            "kombu_version": importlib.import_module("kombu").__version__,
            "redis_py_version": redis.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "details": {
            "throughput": {k: v for k, v in throughput.items() if k != "steps_per_s"},
            "chain": {k: v for k, v in chain.items() if k != "steps_per_s"},
            "latency_ms": latency,
            "tasks_per_worker_incl_warmup": tasks_per_worker,
        },
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        result = run(args)
    except BenchError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except SystemExit as exc:
        log.error("terminated (exit code %s)", exc.code)
        raise
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
