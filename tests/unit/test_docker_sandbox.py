"""The docker backend's pure part: the container it asks for, and what it sends on stdin.

(A container really running is in tests/integration/test_sandbox.py, skipped where no
Docker engine answers.)"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agentflow_core.exec_profile import ExecProfile
from agentflow_worker.sandbox.base import SandboxRequest
from agentflow_worker.sandbox.docker import BOOTSTRAP, LABEL, DockerSandbox, container_request, stdin_payload
from tests.support.profiles import small_profile

PROFILE = small_profile(runtime="docker", cpu_seconds=2.5)
REQUEST = SandboxRequest(argv=["python3", "-I", "main.py"], env={"TOKEN": "s3cret"}, files={"main.py": b"print(1)"})


def kwargs(profile: ExecProfile = PROFILE, runtime: str | None = None) -> dict[str, Any]:
    return container_request(profile, REQUEST, "python:3.11-slim", runtime)


def test_isolation_settings() -> None:
    k = kwargs()
    assert k["image"] == "python:3.11-slim"
    assert k["network_mode"] == "none"
    assert k["read_only"] is True
    assert k["tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=256m,mode=1777"}
    assert k["mem_limit"] == "256m" and k["memswap_limit"] == "256m"  # no swap beyond the limit
    assert k["nano_cpus"] == 1_000_000_000
    assert k["pids_limit"] == 32
    assert k["cap_drop"] == ["ALL"]
    assert k["security_opt"] == ["no-new-privileges"]
    assert k["user"] == "65534:65534"
    assert k["init"] is True
    assert k["labels"] == {LABEL: "1"}
    assert "runtime" not in k
    limits = {u["name"]: (u["soft"], u["hard"]) for u in k["ulimits"]}
    assert limits == {"cpu": (3, 4), "fsize": (8 * 2**20, 8 * 2**20), "nofile": (64, 64), "core": (0, 0)}


def test_secrets_and_files_stay_out_of_the_container_config() -> None:
    text = json.dumps(kwargs())
    assert "s3cret" not in text and "print(1)" not in text
    assert "environment" not in kwargs()
    assert kwargs()["command"] == ["python3", "-I", "-c", BOOTSTRAP, "python3", "-I", "main.py"]


def test_allowlist_profile_enables_the_network() -> None:
    k = kwargs(replace(PROFILE, network="allowlist", allowed_hosts=("api.example.com",)))
    assert k["network_mode"] == "bridge"


def test_filesystem_none_has_no_tmpfs_and_refuses_files() -> None:
    none = replace(PROFILE, filesystem="none")
    assert kwargs(none)["tmpfs"] == {}
    assert kwargs(none)["read_only"] is True
    with pytest.raises(ValueError, match="filesystem 'none' has no place for files"):
        stdin_payload(none, REQUEST)
    assert stdin_payload(none, SandboxRequest(argv=["true"]))  # no files: fine


def test_gvisor_runtime_is_passed_through() -> None:
    assert kwargs(runtime="runsc")["runtime"] == "runsc"


def test_bootstrap_writes_files_sets_env_and_passes_stdin_on(tmp_path: Path) -> None:
    """The bootstrap runs here as it would in the container (with a scratch workdir)."""
    request = SandboxRequest(
        argv=[
            sys.executable,
            "-I",
            "-c",
            "import os, sys; print(open('d/f.txt').read(), os.environ['TOKEN'], sys.stdin.read())",
        ],
        env={"TOKEN": "s3cret"},
        files={"d/f.txt": b"given"},
        stdin=b"rest of stdin",
    )
    payload = stdin_payload(PROFILE, request, workdir=str(tmp_path / "work"))
    head = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "big")])
    assert head["env"] == {"TOKEN": "s3cret"} and payload.endswith(b"rest of stdin")
    done = subprocess.run(
        [sys.executable, "-I", "-c", BOOTSTRAP, *request.argv], input=payload, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"given s3cret rest of stdin\n"


def test_command_keeps_secret_values_off_the_command_line() -> None:
    argv = DockerSandbox(runtime="runsc").command(PROFILE, ["node", "server.js"], {"TOKEN": "s3cret"})
    assert "s3cret" not in " ".join(argv)
    assert argv[argv.index("-e") + 1] == "TOKEN"
    for flag, value in (("--network", "none"), ("--pids-limit", "32"), ("--cap-drop", "ALL"), ("--runtime", "runsc")):
        assert argv[argv.index(flag) + 1] == value
    assert "--read-only" in argv and argv[-3:] == ["python:3.11-slim", "node", "server.js"]


def test_unreachable_engine_is_reported_not_raised() -> None:
    problem = DockerSandbox().available()
    if problem is None:
        pytest.skip("a Docker engine answers here")
    assert problem.startswith("no Docker engine reachable (docker.from_env().ping() failed: ")


def _frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


def test_attach_stream_is_demultiplexed_and_capped() -> None:
    """The engine's attach framing (8-byte headers), over a real socket pair."""
    ours, engine = socket.socketpair()
    kills: list[str] = []
    with ours, engine:
        frames = _frame(1, b"out-1 ") + _frame(2, b"err") + _frame(1, b"out-2") + _frame(1, b"x" * 5000)

        def send() -> None:
            engine.sendall(frames)
            engine.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=send)
        writer.start()
        out, err, truncated = DockerSandbox._collect(ours, 1024, kills.append)
        writer.join()
    assert out == (b"out-1 out-2" + b"x" * 5000)[:1024] and err == b"err"
    assert truncated and kills == ["output limit of 1024 bytes exceeded"]
