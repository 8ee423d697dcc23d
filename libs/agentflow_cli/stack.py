"""``agentflow up``: the whole stack on one machine, as separate processes.

Postgres and NATS are embedded (real servers from the ``embedded`` extra) unless
``AGENTFLOW_DATABASE_URL`` / ``AGENTFLOW_NATS_URL`` point at existing ones. The control
plane and the workers run as child processes with their logs under ``HOME/logs``;
a child that dies is restarted. SIGINT/SIGTERM stop everything in reverse order.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

from agentflow_cli.embedded import EmbeddedNats, EmbeddedPostgres, default_home

console = Console(stderr=True)

STATE_FILE = "stack.json"


def load_stack_state(home: Path | None = None) -> dict[str, str] | None:
    """URL and admin token of a running local stack, for ``agentflow run``."""
    path = (home or default_home()) / STATE_FILE
    try:
        data: dict[str, str] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class Child:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Stack:
    def __init__(self, *, home: Path | None, port: int, workers: int) -> None:
        self.home = (home or default_home()).resolve()
        self.port = port
        self.workers = workers
        self.children: list[Child] = []
        self.postgres: EmbeddedPostgres | None = None
        self.nats: EmbeddedNats | None = None
        self._stop = threading.Event()

    def _secret(self) -> str:
        path = self.home / "jwt_secret"
        if path.exists():
            return path.read_text().strip()
        secret = secrets.token_hex(32)
        _write_private(path, secret)
        return secret

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def run(self, *, demo: bool) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run(demo)
        finally:
            self.shutdown()

    def _run(self, demo: bool) -> int:
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        database_url = os.environ.get("AGENTFLOW_DATABASE_URL")
        nats_url = os.environ.get("AGENTFLOW_NATS_URL")
        if not database_url:
            console.print("[bold]starting[/] PostgreSQL (embedded)")
            self.postgres = EmbeddedPostgres(self.home)
            database_url = self.postgres.start()
        if not nats_url:
            console.print("[bold]starting[/] NATS JetStream (embedded, 127.0.0.1)")
            self.nats = EmbeddedNats(self.home)
            nats_url = self.nats.start()
        console.print("[bold]migrating[/] database")
        from agentflow_control_plane.db.migrate import upgrade

        upgrade(database_url)

        secret = os.environ.get("AGENTFLOW_JWT_SECRET") or self._secret()
        env = {
            **os.environ,
            "AGENTFLOW_DATABASE_URL": database_url,
            "AGENTFLOW_NATS_URL": nats_url,
            "AGENTFLOW_JWT_SECRET": secret,
            "AGENTFLOW_HOST": "127.0.0.1",
            "AGENTFLOW_PORT": str(self.port),
        }
        launcher = [sys.executable, "-m", "agentflow_cli"]
        logs = self.home / "logs"
        self.children.append(Child("control-plane", [*launcher, "control-plane"], env, logs / "control-plane.log"))
        for i in range(1, self.workers + 1):
            worker_env = {**env, "AGENTFLOW_WORKER_NAME": f"worker-{i}"}
            self.children.append(Child(f"worker-{i}", [*launcher, "worker"], worker_env, logs / f"worker-{i}.log"))
        for child in self.children:
            child.start()

        api_url = f"http://127.0.0.1:{self.port}"
        if not self._wait_ready(api_url, timeout_s=60):
            console.print(f"[red]control plane did not become ready; see {logs / 'control-plane.log'}[/]")
            return 1
        from agentflow_control_plane.auth import issue_token

        token = issue_token(secret, tenant="default", roles=["admin"], subject="admin", ttl_s=7 * 24 * 3600)
        _write_private(self.home / STATE_FILE, json.dumps({"api_url": api_url, "token": token}))
        console.print(f"\n[green]AgentFlow is up[/] with {self.workers} worker(s); logs in {logs}")
        console.print(f"  API:     {api_url}   (OpenAPI: {api_url}/docs)")
        console.print(f"  UI:      {api_url}/ui/   (sign in with the token below)")
        console.print("  tenant:  default (admin token valid 7 days)")
        print(f"export AGENTFLOW_API_URL={api_url}")
        print(f"export AGENTFLOW_TOKEN={token}", flush=True)
        if demo:
            self._demo(api_url, token)
        console.print("\nPress Ctrl-C to stop.")
        while not self._stop.wait(0.5):
            for child in self.children:
                if not child.alive() and not self._stop.is_set():
                    child.restarts += 1
                    console.print(f"[yellow]{child.name} exited; restarting (#{child.restarts})[/]")
                    time.sleep(min(child.restarts, 5))
                    child.start()
        return 0

    def _wait_ready(self, api_url: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                if httpx.get(f"{api_url}/readyz", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if not self.children[0].alive():
                return False
            time.sleep(0.2)
        return False

    def _demo(self, api_url: str, token: str) -> None:
        import tempfile

        from agentflow_cli.demo import HELLO_WORKFLOW
        from agentflow_cli.run_command import run_workflow

        console.print("\n[bold]demo:[/] running the 'hello' workflow")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            handle.write(HELLO_WORKFLOW)
        try:
            code = run_workflow(Path(handle.name), {"message": "hello, AgentFlow"}, wait=True, api_url=api_url,
                                token=token, timeout=60)  # fmt: skip
        finally:
            os.unlink(handle.name)
        console.print("[green]demo run succeeded[/]" if code == 0 else "[red]demo run failed[/]")

    def shutdown(self) -> None:
        for child in reversed(self.children):
            child.terminate()
        for child in reversed(self.children):
            child.wait(15)
        self.children.clear()
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
        (self.home / STATE_FILE).unlink(missing_ok=True)
        console.print("stopped")
