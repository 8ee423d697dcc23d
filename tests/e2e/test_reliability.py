"""Crash and outage behaviour with real processes, Postgres and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from tests.support.processes import Api, Cluster, chain_workflow, free_port, wait_ready
from tests.support.services import TestEnv

pytestmark = pytest.mark.e2e
FAST_REDELIVERY = {"AGENTFLOW_STEP_ACK_WAIT_S": "2", "AGENTFLOW_WORKER_STARTED_NOTICE_MS": "0"}


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_worker_killed_mid_step_is_redelivered_and_completes_once(
    make_env: Callable[[], TestEnv],
) -> None:
    env = make_env()
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane(**FAST_REDELIVERY)
        victim = cluster.worker(name="victim", **FAST_REDELIVERY)
        api = Api(url, env, "reliability")
        api.put_workflow(chain_workflow("long", 2, {"type": "sleep", "ms": 1500}))
        run_id = api.start("long", {"n": 1})
        _wait_for(
            lambda: api.run(run_id)["steps"][0]["worker"] == "victim",
            15,
            "victim never started the step",
        )
        victim.kill(signal.SIGKILL)
        cluster.worker(name="survivor", **FAST_REDELIVERY)
        run = api.wait(run_id, timeout=30)
        assert run["status"] == "succeeded", cluster.logs()
        first = run["steps"][0]
        assert first["attempts"] == 2 and first["attempt"] == 1
        assert first["worker"] == "survivor"
        results = [e for e in api.client.get(f"/v1/runs/{run_id}/envelopes").json() if e["kind"] == "result"]
        assert len(results) == 2  # one per step: no step completed twice
        assert results[0]["envelope"]["delivery"] == 2
    finally:
        cluster.close()


def test_control_plane_crash_between_commit_and_publish_is_recovered_by_the_outbox(
    make_env: Callable[[], TestEnv],
) -> None:
    env = make_env()
    cluster = Cluster(env)
    try:
        port = free_port()
        crashing, url = cluster.control_plane(
            port=port, AGENTFLOW_DEV_MODE="true", AGENTFLOW_FAULT_INJECT="exit_after_commit"
        )
        cluster.worker(name="w")
        api = Api(url, env, "outbox")
        api.put_workflow(chain_workflow("crash", 3))
        with pytest.raises(httpx.HTTPError):
            api.client.post("/v1/runs", json={"workflow": "crash", "input": 7})
        crashing.popen.wait(10)
        assert crashing.popen.returncode == 70
        [(run_id, status)] = env.query("SELECT id, status FROM runs")
        assert status == "pending"
        assert env.query("SELECT count(*) FROM outbox")[0][0] == 1  # committed, never published
        cluster.control_plane(port=port)
        run = api.wait(str(run_id), timeout=30)
        assert run["status"] == "succeeded" and run["output"] == 7
        # Published rows are deleted in the background shortly after.
        _wait_for(lambda: env.query("SELECT count(*) FROM outbox")[0][0] == 0, 10, "outbox never drained")
    finally:
        cluster.close()


def test_two_control_planes_never_double_advance_a_run(make_env: Callable[[], TestEnv]) -> None:
    env = make_env()
    cluster = Cluster(env)
    try:
        _, url_a = cluster.control_plane()
        _, url_b = cluster.control_plane()
        cluster.worker(name="w1")
        cluster.worker(name="w2")
        api_a, api_b = Api(url_a, env, "pair"), Api(url_b, env, "pair")
        api_a.put_workflow(chain_workflow("pair", 10))
        runs = [(api_a if i % 2 else api_b).start("pair", i) for i in range(60)]
        for run_id in runs:
            assert api_a.wait(run_id, timeout=60)["status"] == "succeeded"
        rows = env.query(
            "SELECT run_id, count(*) AS steps, count(DISTINCT seq) AS seqs, sum(attempts) AS pickups "
            "FROM steps GROUP BY run_id"
        )
        assert len(rows) == 60
        assert all(r["steps"] == r["seqs"] == 10 for r in rows)
        results = env.query("SELECT step_id, count(*) FROM envelopes WHERE kind = 'result' GROUP BY step_id")
        assert len(results) == 600 and all(r[1] == 1 for r in results)
        # Both control planes took part in consuming results.
        batches = [httpx.get(f"{u}/metrics").text for u in (url_a, url_b)]
        for text in batches:
            count = [line for line in text.splitlines() if line.startswith("agentflow_results_batch_size_count")]
            assert count and float(count[0].split()[-1]) > 0
    finally:
        cluster.close()


class Proxy:
    """A byte proxy (TCP or Unix socket) that can cut every connection, to simulate an outage."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        if isinstance(target, str):  # a Unix socket path: listen on one beside a copy
            self.listen: tuple[str, int] | str = str(Path(tempfile.mkdtemp(prefix="proxy-")) / Path(target).name)
        else:
            self.listen = ("127.0.0.1", free_port())
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.up()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        if isinstance(self.listen, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen)
            self._server = await asyncio.start_unix_server(self._handle, self.listen)
        else:
            self._server = await asyncio.start_server(self._handle, *self.listen)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def up(self) -> None:
        self._call(self._start())

    def down(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)


def _proxied_database_url(url: str) -> tuple[Proxy, str]:
    """A proxy in front of the database, and the URL that goes through it."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "host" in query and query["host"].startswith("/"):  # Unix socket (embedded Postgres)
        port = parts.port or 5432
        proxy = Proxy(f"{query['host']}/.s.PGSQL.{port}")
        assert isinstance(proxy.listen, str)
        query["host"] = str(Path(proxy.listen).parent)
        return proxy, urlunsplit(parts._replace(query=urlencode(query)))
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    assert not isinstance(proxy.listen, str)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return proxy, urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.listen[1]}"))


@pytest.mark.parametrize("outage", ["postgres", "nats"])
def test_outage_is_reported_by_readyz_and_recovered(make_env: Callable[[], TestEnv], outage: str) -> None:
    env = make_env()
    pg_proxy, database_url = _proxied_database_url(env.database_url)
    nats_parts = urlsplit(env.services.nats_url)
    nats_proxy = Proxy((nats_parts.hostname or "127.0.0.1", nats_parts.port or 4222))
    assert not isinstance(nats_proxy.listen, str)
    proxy = pg_proxy if outage == "postgres" else nats_proxy
    extra = {"AGENTFLOW_DATABASE_URL": database_url, "AGENTFLOW_NATS_URL": f"nats://127.0.0.1:{nats_proxy.listen[1]}"}
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane(**extra)
        cluster.worker(name="w", **extra)
        api = Api(url, env, "outage")
        api.put_workflow(chain_workflow("outage", 3))
        assert api.wait(api.start("outage", 1))["status"] == "succeeded"

        proxy.down()
        _wait_for(
            lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503,
            20,
            "readyz stayed 200",
        )
        ready = httpx.get(f"{url}/readyz", timeout=5).json()
        assert ready[outage] is False and ready["ready"] is False
        proxy.up()
        wait_ready(url, timeout=30)
        run = api.wait(api.start("outage", 2), timeout=30)
        assert run["status"] == "succeeded", cluster.logs()
    finally:
        cluster.close()
        pg_proxy.close()
        nats_proxy.close()


def test_step_that_kills_every_worker_fails_after_max_deliveries(make_env: Callable[[], TestEnv]) -> None:
    env = make_env()
    settings = {**FAST_REDELIVERY, "AGENTFLOW_STEP_ACK_WAIT_S": "1", "AGENTFLOW_STEP_MAX_DELIVER": "2"}
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane(**settings)
        api = Api(url, env, "stalled")
        api.put_workflow(chain_workflow("stalls", 1, {"type": "sleep", "ms": 10_000}))
        run_id = api.start("stalls", None)
        for n in (1, 2):
            victim = cluster.worker(name=f"victim-{n}", **settings)
            _wait_for(lambda n=n: api.run(run_id)["steps"][0]["worker"] == f"victim-{n}", 15, f"victim-{n} idle")
            victim.kill(signal.SIGKILL)
        run = api.wait(run_id, timeout=20)
        assert run["status"] == "failed", cluster.logs()
        assert "no worker finished the step in 2 deliveries" in run["steps"][0]["error"]
    finally:
        cluster.close()
