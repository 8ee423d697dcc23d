"""Escape tests against the real process sandbox (bubblewrap, rlimits, cgroups, uid switch).

Every containment test runs a hostile program and checks three things: it was stopped,
the result says why in plain words, and it was stopped within a bounded time. The
services the sandbox must not reach are the suite's real Postgres and NATS; each
"cannot reach" is paired with the same connection succeeding from outside.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agentflow_core.exec_profile import ExecProfile, ExecProfileCompiler, TenantToolPolicy
from agentflow_core.tools import BUILTIN_TOOLS, ToolSpec
from agentflow_worker.sandbox.base import SandboxBackend, SandboxRequest, SandboxResult
from agentflow_worker.sandbox.docker import DockerSandbox
from agentflow_worker.sandbox.process import ProcessSandbox
from agentflow_worker.tools.errors import ToolFailure
from agentflow_worker.tools.sandboxed import CodeExecutorHandler, CommandToolHandler
from tests.support.profiles import small_profile
from tests.support.services import Services

SANDBOX = ProcessSandbox()
UNAVAILABLE = SANDBOX.available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"process sandbox unavailable: {UNAVAILABLE}")

PY = SANDBOX.python
#: generous ceiling on the time any contained call may take beyond its own timeout
SLACK_S = 4.0


profile = small_profile


async def py(code: str, prof: ExecProfile | None = None, *, args: tuple[str, ...] | list[str] = (),
             **request: Any) -> SandboxResult:  # fmt: skip
    files = {"main.py": code.encode(), **request.pop("files", {})}
    argv = [PY, "-I", "main.py", *args]
    return await SANDBOX.run(prof or profile(), SandboxRequest(argv=argv, files=files, **request))


async def bash(script: str, prof: ExecProfile | None = None, **request: Any) -> SandboxResult:
    return await SANDBOX.run(prof or profile(), SandboxRequest(argv=["/bin/bash", "-c", script], **request))


HERE = os.path.realpath(__file__)


def host_read(path: str) -> str:
    return Path(path).read_text()


def host_exists(path: str) -> bool:
    return Path(path).exists()


def cmdlines_containing(needle: bytes) -> list[str]:
    """Host processes whose command line holds ``needle`` (any user may read these)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
    return found


def endpoints(services: Services) -> list[tuple[str, int]]:
    out = []
    for url in (services.admin_database_url, services.nats_url):
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        out.append((parts.hostname, parts.port))
    return out


CONNECT = """
import json, socket, sys
out = {}
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=2).close()
        out[f"{host}:{port}"] = "connected"
    except OSError as exc:
        out[f"{host}:{port}"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


async def connect_from_sandbox(prof: ExecProfile, targets: list[tuple[str, int]]) -> dict[str, str]:
    result = await py(CONNECT, prof, args=[json.dumps(targets)])
    assert result.exit_code == 0, result.stderr
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


# --- what this machine uses -------------------------------------------------------------


def test_describe_names_the_limit_mechanisms() -> None:
    info = SANDBOX.describe()
    print("process sandbox on this machine:", json.dumps(info))
    assert info["pids_limit"] in ("cgroup-v1 pids.max", "cgroup-v2 pids.max", "RLIMIT_NPROC on a per-call uid")
    assert ProcessSandbox(use_cgroups=False).describe()["pids_limit"] == "RLIMIT_NPROC on a per-call uid"


# --- network ----------------------------------------------------------------------------


async def test_loopback_services_reachable_outside_but_not_inside(services: Services) -> None:
    targets = endpoints(services)
    for host, port in targets:  # the same connections work from the host
        socket.create_connection((host, port), timeout=2).close()
    answer = await connect_from_sandbox(profile(), targets)
    assert len(answer) == 2
    for target, outcome in answer.items():
        assert outcome != "connected", f"{target} was reachable from the sandbox"
        assert re.search(r"(Network is unreachable|Connection refused)", outcome), outcome


async def test_allowlist_profile_shares_the_network(services: Services) -> None:
    targets = endpoints(services)
    answer = await connect_from_sandbox(profile(network="allowlist", allowed_hosts=("127.0.0.1",)), targets)
    assert set(answer.values()) == {"connected"}, answer


# --- filesystem -------------------------------------------------------------------------


READ_PROBE = """
import json, os, sys
out = {}
for p in json.loads(sys.argv[1]):
    try:
        open(p).read(); out[p] = "read"
    except OSError as exc:
        out[p] = type(exc).__name__
out["/"] = sorted(os.listdir("/"))
out["/root"] = sorted(os.listdir("/root"))
print(json.dumps(out))
"""


async def test_host_files_outside_the_binds_are_invisible() -> None:
    with tempfile.NamedTemporaryFile("w", dir="/tmp", suffix=".secret", delete=False) as f:
        f.write("host secret")
    try:
        assert host_read(f.name) == "host secret"
        paths = [f.name, "/work/main/pyproject.toml", "/root/.bash_history", "/etc/passwd", "/etc/shadow",
                 "/proc/1/environ", HERE]  # fmt: skip
        result = await py(READ_PROBE, args=[json.dumps(paths)])
    finally:
        os.unlink(f.name)
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    for path in paths:
        assert seen[path] in ("FileNotFoundError", "PermissionError"), (path, seen[path])
    # only the system binds, the python prefix's parents, and the sandbox's own mounts
    allowed = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev", "tmp", "root"}
    assert set(seen["/"]) <= allowed and "work" not in seen["/"], seen["/"]
    if SANDBOX.python_prefix.startswith("/root/"):
        assert seen["/root"] == [".pyenv"] or seen["/root"] == [SANDBOX.python_prefix.split("/")[2]]


WRITE_ANYWHERE = """
import json, sys
out = {}
for p in json.loads(sys.argv[1]):
    try:
        open(p, "w").write("x"); out[p] = "written"
    except OSError as exc:
        out[p] = type(exc).__name__
print(json.dumps(out))
"""


async def test_writes_outside_the_tmpfs_fail() -> None:
    targets = ["/usr/x", "/etc/x", "/x", "/dev/x", "/proc/x", f"{SANDBOX.python_prefix}/x", "/tmp/work/ok", "/tmp/ok"]
    result = await py(WRITE_ANYWHERE, args=[json.dumps(targets)])
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen.pop("/tmp/work/ok") == "written" and seen.pop("/tmp/ok") == "written"
    for path, outcome in seen.items():
        assert outcome in ("PermissionError", "OSError", "FileNotFoundError"), (path, outcome)
    assert not host_exists("/usr/x") and not host_exists("/etc/x")


WRITE_PROBE = """
import json
out = {"data": open("data.txt").read()}
for p in ["data.txt", "new.txt", "/tmp/new.txt", "/new.txt"]:
    try:
        open(p, "a").write("more"); out[p] = "written"
    except OSError as exc:
        out[p] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    ("filesystem", "writable"),
    [("tmp", {"data.txt", "new.txt", "/tmp/new.txt"}), ("read_only", set()), ("none", set())],
)
async def test_filesystem_grants(filesystem: str, writable: set[str]) -> None:
    result = await py(WRITE_PROBE, profile(filesystem=filesystem), files={"data.txt": b"given"})
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen.pop("data") == "given"
    assert {p for p, outcome in seen.items() if outcome == "written"} == writable, seen


async def test_bad_file_names_are_refused() -> None:
    with pytest.raises(ValueError, match="must be a relative path"):
        await bash("true", files={"../escape": b"x"})


# --- identity, capabilities, environment ----------------------------------------------------


async def test_capabilities_dropped_and_uid_unprivileged() -> None:
    result = await bash("grep -E '^(Uid|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status")
    assert result.exit_code == 0, result.stderr
    status = dict(line.split(":", 1) for line in result.stdout.decode().splitlines())
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap].strip(), 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    uids = {int(u) for u in status["Uid"].split()}
    assert 0 not in uids and uids


async def test_env_has_exactly_the_given_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_HOST_ONLY", "host-value-must-not-leak")
    assert os.environ["AGENTFLOW_HOST_ONLY"]
    result = await py(
        "import json, os; print(json.dumps(dict(os.environ)))", env={"API_TOKEN": "s3cret-token", "LANG": "C.UTF-8"}
    )
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen.pop("PWD") == "/tmp/work"  # bwrap's --chdir sets it
    assert seen == {"API_TOKEN": "s3cret-token", "LANG": "C.UTF-8"}


async def test_secrets_never_appear_on_a_command_line() -> None:
    secret = "s3cret-" + os.urandom(8).hex()
    call = asyncio.ensure_future(bash('sleep 1; printf %s "$TOKEN"', env={"TOKEN": secret}))
    await asyncio.sleep(0.5)
    leaked = cmdlines_containing(secret.encode())
    result = await call
    assert result.stdout.decode() == secret  # it was running and had the secret
    assert leaked == []


# --- containment ----------------------------------------------------------------------------

BOMBS: dict[str, tuple[list[str], ExecProfile, str]] = {
    # The shell stays (sleep) until the bomb has met the limit: with a bare `wait` it could
    # exit before its detached grandchildren reach 32 processes, and the namespace dies with it.
    "fork bomb": (["/bin/bash", "-c", ":(){ :|:& };:; sleep 1"], profile(timeout_s=4), "process limit of 32 reached"),
    "persistent fork bomb": (
        [PY, "-I", "-c", "import os, time\nwhile True:\n    try: os.fork()\n    except OSError: time.sleep(0.01)"],
        profile(timeout_s=3),
        "process limit of 32 reached; timed out after 3s",
    ),
    "memory bomb": (
        [PY, "-I", "-c", "a = []\nwhile True: a.append(bytearray(10 * 2**20))"],
        profile(),
        "memory limit of 256 MB exceeded",
    ),
    "infinite loop": (
        [PY, "-I", "-c", "while True: pass"],
        profile(cpu_seconds=1, timeout_s=10),
        "CPU time limit of 1s",
    ),
    "1 GB print": (
        [PY, "-I", "-c", "import sys\nfor _ in range(1024): sys.stdout.write('x' * 2**20)"],
        profile(),
        "output limit of 100000 bytes exceeded",
    ),
    "sleep forever": ([PY, "-I", "-c", "import time; time.sleep(3600)"], profile(timeout_s=1), "timed out after 1s"),
}


@pytest.mark.parametrize("name", list(BOMBS))
async def test_bombs_are_contained_while_the_worker_keeps_serving(name: str) -> None:
    argv, prof, reason = BOMBS[name]
    began = time.monotonic()
    bomb_call = asyncio.ensure_future(SANDBOX.run(prof, SandboxRequest(argv=argv)))
    served: list[tuple[float, SandboxResult]] = []
    while not bomb_call.done():  # the worker goes on serving short calls meanwhile
        short = await bash("echo still serving")
        served.append((time.monotonic() - began, short))
    bomb = await bomb_call
    took = time.monotonic() - began
    print(f"{name}: {bomb.reason!r} after {took:.2f}s; {len(served)} short calls served meanwhile")
    assert bomb.reason is not None and reason in bomb.reason, (bomb.reason, bomb.exit_code, bomb.stderr[-500:])
    assert took < prof.timeout_s + SLACK_S
    assert served and served[0][0] < took, "no short call completed while the bomb ran"
    for _, short in served:
        assert short.exit_code == 0 and short.reason is None and short.stdout == b"still serving\n", short
    if name == "1 GB print":
        assert bomb.truncated and len(bomb.stdout) == prof.output_bytes


async def test_signals_are_named() -> None:
    result = await py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert result.reason == "killed by signal 11 (SIGSEGV)"
    assert result.exit_code == 128 + 11


async def test_file_size_limit_is_named() -> None:
    result = await py("open('big', 'wb').write(b'x' * (2 * 2**20))", profile(max_file_mb=1))
    assert result.reason is not None and "file size limit of 1 MB exceeded" in result.reason


async def test_cgroups_are_removed_after_calls() -> None:
    cg = SANDBOX.cgroups
    if cg is None:
        pytest.skip(f"no cgroup on this machine: {SANDBOX.describe()['cgroup_problem']}")
    await asyncio.gather(bash("true"), bash("sleep 10", profile(timeout_s=0.5)))
    mine = f"{cg.PREFIX}{os.getpid()}-"
    left = [p for h in (cg.pids, cg.memory) if h for p in h.parent.glob(mine + "*")]
    assert left == []


async def test_fallback_without_cgroups_still_limits_processes() -> None:
    sandbox = ProcessSandbox(use_cgroups=False)
    prof = profile(max_processes=8)
    spawn = (
        "import os, time\nfor i in range(12):\n    if os.fork() == 0: time.sleep(2); os._exit(0)\nprint('all forked')"
    )
    # two at once: each call has a uid of its own, so each gets its own 8 processes
    results = await asyncio.gather(*(sandbox.run(prof, SandboxRequest(argv=[PY, "-I", "-c", spawn])) for _ in range(2)))
    for result in results:
        assert result.reason == "process limit of 8 reached", (result.reason, result.stderr[-300:])
    ok = await sandbox.run(prof, SandboxRequest(argv=[PY, "-I", "-c", spawn.replace("12", "5")]))
    assert ok.exit_code == 0 and ok.stdout == b"all forked\n", ok


async def test_command_argv_confines_a_long_lived_child() -> None:
    argv = SANDBOX.command(profile(), ["/bin/bash", "-c", 'read line; echo "$line $TOKEN $(id -u)"; ls /tmp/work'], {})
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"TOKEN": "tok"},
    )
    out, err = await asyncio.wait_for(proc.communicate(b"hello\n"), 10)
    assert proc.returncode == 0, err
    words = out.decode().split()
    assert words[:2] == ["hello", "tok"] and int(words[2]) != 0
    assert "tok" not in " ".join(argv)


# --- the handlers -------------------------------------------------------------------------


def compiled(spec: ToolSpec, **policy: Any) -> ExecProfile:
    return ExecProfileCompiler().compile(spec, TenantToolPolicy(**policy))


BACKENDS: dict[str, SandboxBackend] = {"process": SANDBOX, "docker": DockerSandbox()}


async def test_code_executor_runs_python_and_bash() -> None:
    spec = BUILTIN_TOOLS["code_executor"]
    handler = CodeExecutorHandler(BACKENDS)
    prof = compiled(spec)
    assert prof.runtime == "process" and prof.filesystem == "tmp"
    out = await handler.invoke(spec, prof, {"language": "python", "code": "import sys\nprint(sum(map(int, sys.stdin)))",
                                            "stdin": "1\n2\n3\n"}, {})  # fmt: skip
    assert out == {"stdout": "6\n", "stderr": "", "exit_code": 0, "truncated": False, "reason": None}
    out = await handler.invoke(spec, prof, {"language": "bash", "code": "echo $HOME; pwd; exit 3"}, {})
    assert out["stdout"] == "/tmp\n/tmp/work\n" and out["exit_code"] == 3 and out["reason"] is None


async def test_code_executor_reports_containment_as_a_result() -> None:
    spec = BUILTIN_TOOLS["code_executor"]
    handler = CodeExecutorHandler(BACKENDS)
    prof = replace(compiled(spec), timeout_s=1.0)
    out = await handler.invoke(
        spec, prof, {"language": "python", "code": "print('\\xff'); import time; time.sleep(9)"}, {}
    )
    assert out["reason"] == "timed out after 1s" and out["exit_code"] == 137
    out = await handler.invoke(spec, prof, {"language": "python", "code": "raise SystemExit('bad input')"}, {})
    assert out["exit_code"] == 1 and out["stderr"] == "bad input\n" and out["reason"] is None
    with pytest.raises(ToolFailure, match="language 'ruby' is not enabled"):
        await handler.invoke(spec, prof, {"language": "ruby", "code": "puts 1"}, {})


async def test_code_executor_with_no_filesystem_and_the_docker_runtime() -> None:
    spec = BUILTIN_TOOLS["code_executor"]
    handler = CodeExecutorHandler(BACKENDS)
    prof = compiled(spec, max_filesystem="none")
    out = await handler.invoke(spec, prof, {"language": "bash", "code": "touch x 2>&1 || echo refused"}, {})
    assert out["stdout"].endswith("refused\n"), out
    on_docker = replace(prof, runtime="docker")
    if DockerSandbox().available() is not None:  # no engine here: the call fails with that reason
        with pytest.raises(ToolFailure, match="docker sandbox is unavailable: no Docker engine reachable"):
            await handler.invoke(spec, on_docker, {"language": "bash", "code": "true"}, {})
    else:  # no place for a file there: the code goes as an argument
        out = await handler.invoke(spec, on_docker, {"language": "bash", "code": "touch x 2>&1 || echo refused"}, {})
        assert out["stdout"].endswith("refused\n"), out
    with pytest.raises(ToolFailure, match="'gvisor' sandbox, which this worker does not have"):
        await handler.invoke(spec, replace(prof, runtime="gvisor"), {"language": "bash", "code": "true"}, {})


def command_tool(code: str) -> ToolSpec:
    return ToolSpec(id="adder", handler={"kind": "command", "argv": [PY, "-I", "-c", code]})


async def test_command_tool_json_contract() -> None:
    handler = CommandToolHandler(BACKENDS)
    spec = command_tool("import json, sys\nargs = json.load(sys.stdin)\nprint(json.dumps({'sum': sum(args['xs'])}))")
    assert await handler.invoke(spec, compiled(spec), {"xs": [1, 2, 3]}, {}) == {"sum": 6}

    spec = command_tool("print('not json')")
    with pytest.raises(ToolFailure, match=r"command tool 'adder' printed no JSON: .*'not json"):
        await handler.invoke(spec, compiled(spec), {}, {})

    spec = command_tool("import sys; sys.exit('broken tool')")
    with pytest.raises(ToolFailure, match="command tool 'adder' exited with code 1; stderr: broken tool"):
        await handler.invoke(spec, compiled(spec), {}, {})

    spec = command_tool("while True: pass")
    prof = replace(compiled(spec), cpu_seconds=1.0)
    with pytest.raises(ToolFailure, match="command tool 'adder' was stopped: CPU time limit of 1s exceeded"):
        await handler.invoke(spec, prof, {}, {})


async def test_command_tool_gets_its_secrets_only() -> None:
    handler = CommandToolHandler(BACKENDS)
    spec = command_tool("import json, os\nprint(json.dumps(sorted(os.environ)))")
    names = await handler.invoke(spec, compiled(spec), {}, {"SERVICE_KEY": "k"})
    assert names == ["HOME", "LANG", "PATH", "PWD", "SERVICE_KEY"]


# --- docker: only where an engine answers ---------------------------------------------------


def _docker_problem() -> str | None:
    return DockerSandbox().available()


@pytest.mark.skipif(_docker_problem() is not None, reason=str(_docker_problem()))
async def test_docker_backend_runs_a_contained_container() -> None:
    docker = DockerSandbox()
    result = await docker.run(
        profile(runtime="docker"),
        SandboxRequest(
            argv=["sh", "-c", 'cat data.txt; echo " $TOKEN $(id -u)"; touch /x 2>/dev/null || echo ro'],
            env={"TOKEN": "t"},
            files={"data.txt": b"given"},
        ),
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"given t 65534\nro\n"
    loop = await docker.run(profile(runtime="docker", timeout_s=2), SandboxRequest(argv=["sh", "-c", "sleep 60"]))
    assert loop.reason == "timed out after 2s"
