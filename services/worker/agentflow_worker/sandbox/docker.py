"""The ``docker`` sandbox: one throw-away container per call, through the Docker SDK.

Isolation per call (see :func:`container_request`, the pure part, unit-tested): no network
(``network_mode="none"``) unless the profile allows it, a read-only root filesystem with a
size-capped tmpfs at ``/tmp`` (none at all for ``filesystem: none``), memory without swap,
a CPU share, ``pids_limit``, rlimits for CPU time, file size and open files, every
capability dropped, ``no-new-privileges``, user ``nobody``, an init process reaping
zombies, and gVisor (``runtime="runsc"``) when configured.

Secrets and files never go into the container's configuration (which the engine keeps on
disk and ``docker inspect`` shows): a small Python bootstrap in the container reads them,
framed, from stdin, writes the files to ``/tmp/work``, and ``exec``\\ s the program with the
environment and the rest of stdin. So the image must have ``python3`` (the default
``python:3.11-slim`` does).

Network: an ``allowlist`` profile gets the default bridge network — **no filtering by
host** (that needs an egress proxy, not built yet), the same limitation as the process
backend.

Containers are removed explicitly when the call ends rather than with ``auto_remove``:
the engine would delete an auto-removed container before its OOM flag could be read. Each
carries the label ``agentflow.sandbox=1``; leftovers of a crashed worker are removed by
:meth:`DockerSandbox.sweep` (run on first use).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import math
import re
import socket
import struct
import threading
import time
from typing import Any

from agentflow_core.exec_profile import ExecProfile
from agentflow_worker.sandbox.base import SandboxRequest, SandboxResult, SandboxUnavailable

log = logging.getLogger("agentflow.sandbox")

MIB = 1024 * 1024
WORKDIR = "/tmp/work"
LABEL = "agentflow.sandbox"
DEFAULT_IMAGE = "python:3.11-slim"

#: Runs first in every container: reads ``8-byte length + JSON {env, files, read_only}``
#: from stdin, writes the files, then becomes the program (the rest of stdin is its stdin).
BOOTSTRAP = r"""
import base64, json, os, sys
def rd(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit("agentflow sandbox bootstrap: stdin ended early")
        b += c
    return b
head = json.loads(rd(int.from_bytes(rd(8), "big")))
if head["workdir"]:
    os.makedirs(head["workdir"], exist_ok=True)
    for name, data in head["files"].items():
        path = os.path.join(head["workdir"], name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        if head["read_only"]:
            os.chmod(path, 0o444)
    os.chdir(head["workdir"])
env = dict(os.environ)
env.update(head["env"])
os.execvpe(sys.argv[1], sys.argv[1:], env)
""".strip()


def container_request(profile: ExecProfile, request: SandboxRequest, image: str, runtime: str | None) -> dict[str, Any]:
    """The keyword arguments of ``client.containers.create`` for one call. Pure."""
    memory = f"{profile.memory_mb}m"
    cpu = max(1, math.ceil(profile.cpu_seconds))
    kwargs: dict[str, Any] = {
        "image": image,
        "command": ["python3", "-I", "-c", BOOTSTRAP, *request.argv],
        "user": "65534:65534",
        "network_mode": "bridge" if profile.network == "allowlist" else "none",
        "read_only": True,
        "tmpfs": {},
        "working_dir": "/",
        "mem_limit": memory,
        # equal to mem_limit: no swap on top of the memory limit
        "memswap_limit": memory,
        "nano_cpus": 1_000_000_000,
        "pids_limit": profile.max_processes,
        "ulimits": [
            {"name": "cpu", "soft": cpu, "hard": cpu + 1},
            {"name": "fsize", "soft": profile.max_file_mb * MIB, "hard": profile.max_file_mb * MIB},
            {"name": "nofile", "soft": profile.max_open_files, "hard": profile.max_open_files},
            {"name": "core", "soft": 0, "hard": 0},
        ],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "init": True,
        "ipc_mode": "private",
        "stdin_open": True,
        "stdin_once": True,
        "labels": {LABEL: "1"},
        "auto_remove": False,
    }
    if profile.ro_binds:
        kwargs["volumes"] = {path: {"bind": path, "mode": "ro"} for path in profile.ro_binds}
    if profile.filesystem != "none":
        kwargs["tmpfs"] = {"/tmp": f"rw,nosuid,nodev,size={profile.memory_mb}m,mode=1777"}
    if runtime:
        kwargs["runtime"] = runtime
    return kwargs


def stdin_payload(profile: ExecProfile, request: SandboxRequest, workdir: str = WORKDIR) -> bytes:
    """What the bootstrap reads first, then the program's own stdin. Pure."""
    if request.files and profile.filesystem == "none":
        raise ValueError("filesystem 'none' has no place for files on the docker backend")
    head = {
        "env": request.env,
        "files": {name: base64.b64encode(data).decode() for name, data in request.files.items()},
        # read_only on docker: files are made 0444, but the program owns them and could
        # chmod them back; only the process backend mounts them read-only
        "read_only": profile.filesystem == "read_only",
        "workdir": workdir if profile.filesystem != "none" else None,
    }
    data = json.dumps(head).encode()
    return len(data).to_bytes(8, "big") + data + request.stdin


class DockerSandbox:
    """One container per call. ``runtime="runsc"`` runs it under gVisor."""

    name = "docker"
    #: ``filesystem: none`` leaves no place to put request files
    files_without_filesystem = False

    def __init__(self, *, image: str = DEFAULT_IMAGE, runtime: str | None = None, python: str = "python3") -> None:
        self.image = image
        self.runtime = runtime
        #: the interpreter as seen inside the container
        self.python = python
        self._client: Any = None
        self._swept = False

    def _connect(self) -> Any:
        if self._client is None:
            try:
                # imported by name: the SDK is an optional extra and ships no type stubs
                docker: Any = importlib.import_module("docker")
            except ImportError as exc:
                raise SandboxUnavailable("docker SDK not installed: pip install 'agentflow[docker]'") from exc
            try:
                client = docker.from_env(timeout=10)
                client.ping()
            except Exception as exc:
                raise SandboxUnavailable(
                    f"no Docker engine reachable (docker.from_env().ping() failed: {exc})"
                ) from exc
            self._client = client
        return self._client

    def available(self) -> str | None:
        try:
            self._connect()
        except SandboxUnavailable as exc:
            return str(exc)
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "image": self.image,
            "runtime": self.runtime or "runc",
            "pids_limit": "docker pids_limit (cgroup)",
            "memory_limit": "docker mem_limit (cgroup), no swap",
            "network_filtering": "none (an allowlist profile gets the bridge network)",
        }

    def sweep(self) -> None:
        """Remove containers a crashed worker left behind."""
        client = self._connect()
        for container in client.containers.list(all=True, filters={"label": LABEL, "status": "exited"}):
            with contextlib.suppress(Exception):
                container.remove(force=True)

    def command(self, profile: ExecProfile, argv: list[str], env: dict[str, str]) -> list[str]:
        """``docker run`` argv for a long-lived child. Variables are passed by name only
        (``-e NAME``: the CLI takes the value from its own environment), so start the argv
        with ``env`` in its environment; values never appear on the command line."""
        kwargs = container_request(profile, SandboxRequest(argv=argv), self.image, self.runtime)
        args = ["docker", "run", "--rm", "-i", "--init", "--user", kwargs["user"], "--network", kwargs["network_mode"]]
        args += ["--read-only", "--memory", kwargs["mem_limit"], "--memory-swap", kwargs["memswap_limit"]]
        args += ["--cpus", "1", "--pids-limit", str(profile.max_processes), "--cap-drop", "ALL"]
        args += ["--security-opt", "no-new-privileges", "--label", f"{LABEL}=1"]
        for limit in kwargs["ulimits"]:
            args += ["--ulimit", f"{limit['name']}={limit['soft']}:{limit['hard']}"]
        for path, options in kwargs["tmpfs"].items():
            args += ["--tmpfs", f"{path}:{options}"]
        if self.runtime:
            args += ["--runtime", self.runtime]
        for key in env:
            args += ["-e", key]
        return [*args, self.image, *argv]

    async def run(self, profile: ExecProfile, request: SandboxRequest) -> SandboxResult:
        if not request.argv:
            raise ValueError("SandboxRequest.argv must name a program")
        payload = stdin_payload(profile, request)
        client = await asyncio.to_thread(self._connect)
        return await asyncio.to_thread(self._run_sync, client, profile, request, payload)

    def _run_sync(self, client: Any, profile: ExecProfile, request: SandboxRequest, payload: bytes) -> SandboxResult:
        if not self._swept:
            self._swept = True
            with contextlib.suppress(Exception):
                self.sweep()
        container = client.containers.create(**container_request(profile, request, self.image, self.runtime))
        reasons: list[str] = []
        killed = threading.Event()

        def kill(reason: str) -> None:
            if killed.is_set():
                return
            killed.set()
            reasons.append(reason)
            with contextlib.suppress(Exception):
                container.kill()

        started = time.monotonic()
        try:
            sock = container.attach_socket(params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            raw = getattr(sock, "_sock", sock)
            container.start()
            timer = threading.Timer(profile.timeout_s, kill, args=(f"timed out after {profile.timeout_s:g}s",))
            timer.daemon = True
            timer.start()

            def feed() -> None:
                with contextlib.suppress(OSError):
                    raw.sendall(payload)
                    raw.shutdown(socket.SHUT_WR)

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            out, err, truncated = self._collect(raw, profile.output_bytes, kill)
            timer.cancel()
            status = container.wait(timeout=profile.timeout_s + 30)
            code = int(status.get("StatusCode", -1))
            container.reload()
            oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        duration = time.monotonic() - started
        return SandboxResult(
            code, out, err, duration, truncated=truncated, reason=_reason(profile, code, err, reasons, killed, oom)
        )

    @staticmethod
    def _collect(raw: Any, cap: int, kill: Any) -> tuple[bytes, bytes, bool]:
        """Demultiplex the attach stream (8-byte frame headers) into capped stdout/stderr."""
        bufs = {1: bytearray(), 2: bytearray()}
        truncated = False
        pending = bytearray()
        while True:
            try:
                chunk = raw.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            while len(pending) >= 8:
                stream, size = struct.unpack(">BxxxL", pending[:8])
                if len(pending) < 8 + size:
                    break
                data = bytes(pending[8 : 8 + size])
                del pending[: 8 + size]
                buf = bufs.get(stream)
                if buf is None or truncated:
                    continue
                if len(buf) + len(data) > cap:
                    buf += data[: cap - len(buf)]
                    truncated = True
                    kill(f"output limit of {cap} bytes exceeded")
                else:
                    buf += data
        return bytes(bufs[1]), bytes(bufs[2]), truncated


def _reason(
    profile: ExecProfile, code: int, err: bytes, ours: list[str], killed: threading.Event, oom: bool
) -> str | None:
    found: list[str] = []
    if re.search(rb"Resource temporarily unavailable|[Cc]annot fork", err) and code != 0:
        found.append(f"process limit of {profile.max_processes} reached")
    if oom or (code != 0 and re.search(rb"MemoryError|[Cc]annot allocate memory", err)):
        found.append(f"memory limit of {profile.memory_mb} MB exceeded")
    sig = code - 128 if 128 < code < 128 + 65 else None
    if sig == 24:  # SIGXCPU
        found.append(f"CPU time limit of {profile.cpu_seconds:g}s exceeded")
    if sig == 25 or (code != 0 and b"File too large" in err):  # SIGXFSZ
        found.append(f"file size limit of {profile.max_file_mb} MB exceeded")
    found += ours
    if not found and sig is not None and not killed.is_set():
        found.append(f"killed by signal {sig}")
    return "; ".join(found) or None
