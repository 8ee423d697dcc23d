"""The command line as a user runs it: `agentflow up` with embedded servers, `agentflow run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from agentflow_control_plane.auth import issue_token
from tests.support.processes import Cluster, chain_workflow, free_port
from tests.support.services import TestEnv
from tests.unit.test_spec import HELLO

pytestmark = pytest.mark.e2e
AGENTFLOW = [sys.executable, "-m", "agentflow_cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFLOW_")}
    env.update(extra)
    return env


def test_up_starts_embedded_stack_runs_demo_and_stops_cleanly() -> None:
    home = Path(tempfile.mkdtemp(prefix="agentflow-up-"))
    port = free_port()
    proc = subprocess.Popen([*AGENTFLOW, "up", "--home", str(home), "--port", str(port), "--workers", "2", "--demo"],
                            env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line and proc.poll() is not None:
                break
            output.append(line)
            if "Press Ctrl-C to stop" in line:
                break
        text = "".join(output)
        assert "demo run succeeded" in text, text
        token = next(line.split("=", 1)[1].strip() for line in output if line.startswith("export AGENTFLOW_TOKEN="))
        headers = {"Authorization": f"Bearer {token}"}
        runs = httpx.get(f"http://127.0.0.1:{port}/v1/runs", headers=headers).json()
        assert [r["status"] for r in runs] == ["succeeded"]
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert names.count("agentflow_cli worker") == 2 and "control-plane" in names
        nats = [c for c in psutil.process_iter(["cmdline"]) if str(home) in " ".join(c.info["cmdline"] or [])
                and "nats-server" in " ".join(c.info["cmdline"] or [])]  # fmt: skip
        assert nats and "-a 127.0.0.1" in " ".join(nats[0].cmdline())
        assert oct((home / "jwt_secret").stat().st_mode & 0o777) == "0o600"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert not any(str(home / "pgdata") in " ".join(p.info["cmdline"] or [])
                       for p in psutil.process_iter(["cmdline"]))  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()


def test_run_command_exit_codes(make_env: Callable[[], TestEnv], tmp_path: Path) -> None:
    env = make_env()
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane()
        cluster.worker(name="cli")
        token = issue_token(env.secret, tenant="cli", roles=["operator"], subject="t", ttl_s=600)
        cli_env = _clean_env(AGENTFLOW_API_URL=url, AGENTFLOW_TOKEN=token)
        hello = tmp_path / "hello.yaml"
        hello.write_text(HELLO)
        ok = subprocess.run([*AGENTFLOW, "run", str(hello), "--input", '{"x": 1}'], env=cli_env,
                            capture_output=True, timeout=60)  # fmt: skip
        assert ok.returncode == 0, ok.stderr.decode()
        assert b"succeeded" in ok.stderr and b'{"x": 1}' in ok.stderr
        failing = chain_workflow("failing", 1, {"type": "fail", "times": 1})
        bad = tmp_path / "failing.json"
        bad.write_text(json.dumps(failing))
        failed = subprocess.run([*AGENTFLOW, "run", str(bad)], env=cli_env, capture_output=True, timeout=60)
        assert failed.returncode == 1 and b"failing on purpose" in failed.stderr
        invalid = tmp_path / "invalid.yaml"
        invalid.write_text(HELLO.replace("on_success: done", "on_success: nowhere"))
        refused = subprocess.run([*AGENTFLOW, "run", str(invalid)], env=cli_env, capture_output=True, timeout=60)
        assert refused.returncode == 2 and b"planner.states.nap.on_success" in refused.stderr
        bad_input = subprocess.run([*AGENTFLOW, "run", str(hello), "--input", "{nope"], env=cli_env,
                                   capture_output=True, timeout=60)  # fmt: skip
        assert bad_input.returncode == 2 and b"--input" in bad_input.stderr
    finally:
        cluster.close()


def test_control_plane_refuses_to_start_without_a_secret() -> None:
    result = subprocess.run([*AGENTFLOW, "control-plane"], env=_clean_env(), capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"AGENTFLOW_JWT_SECRET" in result.stderr and b"Traceback" not in result.stderr


def test_up_uses_configured_servers_and_starts_no_embedded_ones(make_env: Callable[[], TestEnv]) -> None:
    env = make_env()
    home = Path(tempfile.mkdtemp(prefix="agentflow-up-ext-"))
    port = free_port()
    proc = subprocess.Popen(
        [*AGENTFLOW, "up", "--home", str(home), "--port", str(port), "--workers", "1"],
        env=_clean_env(
            AGENTFLOW_DATABASE_URL=env.database_url,
            AGENTFLOW_NATS_URL=env.services.nats_url,
            AGENTFLOW_NATS_PREFIX=env.prefix,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            lines.append(line)
            if "Press Ctrl-C" in line or (not line and proc.poll() is not None):
                break
        text = "".join(lines)
        assert "AgentFlow is up" in text, text
        assert "embedded" not in text
        assert not (home / "pgdata").exists() and not (home / "nats").exists()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["ready"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
