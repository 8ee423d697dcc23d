"""Starting control planes and workers as real processes, the way a user does."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agentflow_control_plane.auth import issue_token
from agentflow_core.builders import linear_fsm
from tests.support.services import TestEnv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            self.popen.wait(15)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Control planes and workers of one TestEnv, stopped on close."""

    env: TestEnv
    procs: list[Proc] = field(default_factory=list)
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="agentflow-procs-")))

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log = self.logdir / f"{name}-{len(self.procs)}.log"
        handle = open(log, "wb")  # noqa: SIM115 - owned by the child
        popen = subprocess.Popen([sys.executable, "-m", "agentflow_cli", *args], env=env, stdout=handle,
                                 stderr=subprocess.STDOUT)  # fmt: skip
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def control_plane(self, *, port: int | None = None, wait: bool = True, **extra: str) -> tuple[Proc, str]:
        port = port or free_port()
        env = self.env.env(AGENTFLOW_PORT=str(port), **extra)
        proc = self._spawn("control-plane", ["control-plane"], env)
        url = f"http://127.0.0.1:{port}"
        if wait:
            wait_ready(url, proc)
        return proc, url

    def worker(self, *, name: str | None = None, queue: str = "default", **extra: str) -> Proc:
        worker_name = name or f"w{len(self.procs)}"
        env = self.env.env(AGENTFLOW_WORKER_NAME=worker_name, **extra)
        return self._spawn(f"worker-{worker_name}", ["worker", "--queue", queue], env)

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.output()[-4000:]}" for p in self.procs)


def wait_ready(url: str, proc: Proc | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.output()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


class Api:
    """An httpx client with a token for one tenant."""

    def __init__(self, url: str, env: TestEnv, tenant: str, roles: tuple[str, ...] = ("admin",)) -> None:
        self.url = url
        self.tenant = tenant
        token = issue_token(env.secret, tenant=tenant, roles=list(roles), subject="test", ttl_s=3600)
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def put_workflow(self, spec: str | dict[str, Any], name: str | None = None) -> httpx.Response:
        if isinstance(spec, dict):
            return self.client.put(f"/v1/workflows/{name or spec['name']}", json=spec)
        import yaml

        return self.client.put(
            f"/v1/workflows/{name or yaml.safe_load(spec)['name']}",
            content=spec,
            headers={"Content-Type": "application/yaml"},
        )

    def start(self, workflow: str, run_input: Any = None, **kwargs: Any) -> str:
        response = self.client.post("/v1/runs", json={"workflow": workflow, "input": run_input, **kwargs})
        assert response.status_code == 201, response.text
        run_id: str = response.json()["id"]
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/runs/{run_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait(self, run_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["status"] in ("succeeded", "failed", "cancelled"):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run['status']} after {timeout}s: {run}")
            time.sleep(0.05)


chain_workflow = linear_fsm
