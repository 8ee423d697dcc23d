"""The MCP adapter against a real MCP server (tests/support/mcp_server.py, SDK 2.x).

stdio: the server runs inside the process sandbox (bubblewrap), so these tests need what
that sandbox needs (bwrap, prlimit, setpriv, root) and skip with the sandbox's own reason
otherwise. streamable HTTP: the same server as a subprocess on a free local port.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mcp
import pytest
from mcp.types import CallToolResult

from agentflow_core.exec_profile import ExecProfileCompiler, TenantToolPolicy, ToolDenied
from agentflow_core.tools_config import McpConfig, ToolsConfig
from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.sandbox.process import ProcessSandbox
from agentflow_worker.secrets import SecretStore
from agentflow_worker.tools.errors import ToolFailure
from agentflow_worker.tools.mcp import McpManager, McpToolHandler, map_result, tool_local_name
from agentflow_worker.tools.runtime import ToolRuntime
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVER = str(ROOT / "tests" / "support" / "mcp_server.py")
#: where the `mcp` package lives: bound read-only into the sandbox through PYTHONPATH
SITE_PACKAGES = str(Path(mcp.__file__ or "").resolve().parents[1])
HOST_FILE = str(ROOT / "pyproject.toml")
ALL_TOOLS = {"add", "calls", "crash", "echo", "fail", "pixel", "say_hello", "slow", "whoami"}


@pytest.fixture(scope="module")
def sandbox() -> ProcessSandbox:
    backend = ProcessSandbox()
    problem = backend.available()
    if problem:
        pytest.skip(f"the process sandbox cannot run here: {problem}")
    return backend


def stdio_config(sandbox: ProcessSandbox, *, enabled: bool = True, **server: Any) -> McpConfig:
    files: dict[str, Any] = {
        "transport": "stdio",
        # the base interpreter: the sandbox binds its prefix (a venv's python is a symlink into it)
        "command": [sandbox.python, SERVER, "--transport", "stdio", "--page-size", "2"],
        "env": {"PYTHONPATH": SITE_PACKAGES},
        "cost_per_call": 0.01,
        "timeout_s": 20,
    }
    files.update(server)
    return McpConfig.model_validate({"enabled": enabled, "servers": {"files": files}})


def make_manager(config: McpConfig, sandbox: ProcessSandbox | None, secrets: SecretStore | None = None) -> McpManager:
    return McpManager(
        config, sandbox=sandbox, compiler=ExecProfileCompiler(), secrets=secrets or SecretStore(environ={})
    )


@pytest.fixture
async def files(sandbox: ProcessSandbox) -> AsyncIterator[McpManager]:
    manager = make_manager(stdio_config(sandbox), sandbox)
    yield manager
    await manager.close()


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        todo += children.get(child, [])
    return found


def still_there(pids: list[int], wait_s: float) -> dict[int, str]:
    """The /proc/<pid>/stat of those ``pids`` that still exist after up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        left = {}
        for pid in pids:
            try:
                left[pid] = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def server_processes() -> dict[int, str]:
    return {pid: cmd for pid, cmd in descendants(os.getpid()).items() if "mcp_server.py" in cmd or "bwrap" in cmd}


# --- stdio, inside the sandbox --------------------------------------------------------


async def test_stdio_lists_tools_as_specs(files: McpManager) -> None:
    specs = await files.list_tools("files")  # the server lists two per page: every page was followed
    by_id = {s.id: s for s in specs}
    assert set(by_id) == {f"files.{name}" for name in ALL_TOOLS}
    add = by_id["files.add"]
    assert add.description == "Add two integers."
    assert add.input_schema["properties"]["a"]["type"] == "integer"
    assert sorted(add.input_schema["required"]) == ["a", "b"]
    assert add.output_schema is not None and add.output_schema["properties"]["result"]["type"] == "integer"
    assert add.handler.kind == "mcp" and add.handler.server == "files" and add.handler.tool == "add"
    assert add.cost_per_call == 0.01 and add.timeout_s == 20
    assert by_id["files.echo"].output_schema is None  # a tool without structured output
    # a name that is no valid tool id is mapped; the original travels in the handler
    hello = by_id["files.say_hello"]
    assert hello.handler.kind == "mcp" and hello.handler.tool == "say hello"
    # cached: a second listing within the TTL sends no request
    assert await files.list_tools("files") is specs


def test_tool_names_map_to_valid_ids() -> None:
    assert tool_local_name("say hello") == "say_hello"
    assert tool_local_name("ns/get.item") == "ns_get_item"
    assert tool_local_name("a__b") == "a_b"  # "__" would read back as "." in LLM function names
    assert tool_local_name("__x") == "x"
    assert tool_local_name("???") == "tool"


async def test_stdio_calls_map_results(files: McpManager) -> None:
    assert await files.call("files", "add", {"a": 2, "b": 3}) == {"result": 5}
    assert await files.call("files", "echo", {"text": '{"not": "parsed"}'}) == {"text": '{"not": "parsed"}'}
    assert await files.call("files", "say hello", {"name": "Ada"}) == {"result": "hello Ada"}
    # one session serves concurrent calls
    sums = await asyncio.gather(*(files.call("files", "add", {"a": i, "b": i}) for i in range(8)))
    assert sums == [{"result": 2 * i} for i in range(8)]
    assert await files.call("files", "pixel", {}) == {
        "text": "one pixel",
        "content": [{"type": "image", "mime_type": "image/png", "bytes": 70}],
    }


def test_result_mapping_of_other_content() -> None:
    result = CallToolResult.model_validate(
        {
            "content": [
                {"type": "text", "text": "first"},
                {"type": "audio", "data": "AAAA", "mimeType": "audio/wav"},
                {"type": "resource_link", "uri": "file:///a.txt", "name": "a", "mimeType": "text/plain"},
                {"type": "resource", "resource": {"uri": "mem://n", "mimeType": "text/plain", "text": "note"}},
                {"type": "text", "text": "second"},
            ]
        }
    )
    assert map_result(result) == {
        "text": "first\nsecond",
        "content": [
            {"type": "audio", "mime_type": "audio/wav", "bytes": 3},
            {"type": "resource_link", "uri": "file:///a.txt", "name": "a", "mime_type": "text/plain"},
            {"type": "resource", "uri": "mem://n", "mime_type": "text/plain", "text": "note"},
        ],
    }
    structured = CallToolResult.model_validate({"content": [], "structuredContent": {"rows": [1, 2]}})
    assert map_result(structured) == {"rows": [1, 2]}


async def test_stdio_error_result_is_a_tool_failure(files: McpManager) -> None:
    with pytest.raises(ToolFailure, match="the fail tool failed on purpose") as info:
        await files.call("files", "fail", {})
    assert "'fail'" in str(info.value) and "'files'" in str(info.value)
    assert await files.call("files", "add", {"a": 1, "b": 1}) == {"result": 2}  # the session lives on


async def test_stdio_server_is_confined_by_the_sandbox(sandbox: ProcessSandbox) -> None:
    # What the test process itself can reach, so the server's "cannot" means something.
    with socket.create_connection(("127.0.0.1", 5432), timeout=2):
        pass
    assert os.access(HOST_FILE, os.R_OK)
    secrets = SecretStore(environ={"AGENTFLOW_SECRET_FILES_TOKEN": "t0ken"})
    config = stdio_config(sandbox, permissions={"secrets": ["FILES_TOKEN"]})
    manager = make_manager(config, sandbox, secrets)
    try:
        seen = await manager.call("files", "whoami", {"host": "127.0.0.1", "port": 5432, "path": HOST_FILE})
    finally:
        await manager.close()
    profile = manager.server_profile("files", config.servers["files"])
    assert profile.network == "none" and profile.filesystem == "none" and profile.secrets == ("FILES_TOKEN",)
    assert seen["network"] is False, seen["network_error"]
    assert seen["read_file"] is False and "No such file" in seen["read_error"]
    assert seen["pid"] < 10  # a pid namespace of its own
    # the server's shared secret reached it; nothing of the test process's own secrets did
    assert "FILES_TOKEN" in seen["env"]
    assert not [name for name in seen["env"] if name.startswith("AGENTFLOW_")]


async def test_stdio_call_timeout_leaves_the_session_usable(files: McpManager) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 1s"):
        await files.call("files", "slow", {"seconds": 10}, timeout_s=1)
    assert time.monotonic() - started < 5
    assert await files.call("files", "add", {"a": 2, "b": 2}) == {"result": 4}


async def test_stdio_server_dying_mid_call_fails_that_call_and_reconnects(files: McpManager) -> None:
    assert await files.call("files", "add", {"a": 1, "b": 2}) == {"result": 3}
    first = set(server_processes())
    assert first
    with pytest.raises(ToolFailure, match=r"connection closed during tools/call 'crash'.*not retried"):
        await files.call("files", "crash", {})
    # the next call starts a new server process (and session) once
    assert await files.call("files", "add", {"a": 1, "b": 2}) == {"result": 3}
    assert await files.call("files", "calls", {}) == {"result": 1}  # counted by the new process
    assert set(server_processes()).isdisjoint(first)


async def test_close_stops_the_server_process(sandbox: ProcessSandbox) -> None:
    manager = make_manager(stdio_config(sandbox), sandbox)
    await manager.list_tools("files")
    running = server_processes()
    assert any("mcp_server.py" in cmd for cmd in running.values()), running
    await manager.close()
    left = await asyncio.to_thread(still_there, list(running), 5.0)
    assert not left, f"processes left behind (zombies show state Z): {left}"
    with pytest.raises(AgentError, match="closed"):
        await manager.list_tools("files")


async def test_stdio_refused_without_a_sandbox(sandbox: ProcessSandbox) -> None:
    manager = make_manager(stdio_config(sandbox), None)
    with pytest.raises(AgentError, match="never run unconfined"):
        await manager.list_tools("files")
    broken = ProcessSandbox(bwrap="/nonexistent/bwrap")
    manager = make_manager(stdio_config(sandbox), broken)
    with pytest.raises(AgentError, match=r"bwrap not installed.*never run unconfined"):
        await manager.list_tools("files")
    assert not server_processes()


async def test_stdio_server_that_cannot_start_says_why(sandbox: ProcessSandbox) -> None:
    # without PYTHONPATH the sandboxed interpreter has no `mcp` package
    manager = make_manager(stdio_config(sandbox, env={}), sandbox)
    try:
        with pytest.raises(AgentError, match=r"could not be connected.*No module named 'mcp'"):
            await manager.list_tools("files")
    finally:
        await manager.close()


async def test_disabled_flag_and_unknown_server(sandbox: ProcessSandbox) -> None:
    manager = make_manager(stdio_config(sandbox, enabled=False), sandbox)
    with pytest.raises(AgentError, match=r"MCP is disabled \(mcp.enabled: false\)"):
        await manager.list_tools("files")
    with pytest.raises(AgentError, match=r"MCP is disabled \(mcp.enabled: false\)"):
        await manager.call("files", "add", {"a": 1, "b": 2})
    manager = make_manager(stdio_config(sandbox), sandbox)
    with pytest.raises(AgentError, match=r"unknown MCP server 'nope' \(configured: files\)"):
        await manager.list_tools("nope")


# --- streamable HTTP ------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    port = free_port()
    proc = start_http_server(port, "--require-header", "X-Api-Key=s3cret")
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(15)


def start_http_server(port: int, *args: str) -> subprocess.Popen[bytes]:
    """The test server on 127.0.0.1:``port``, once it accepts connections."""
    proc = subprocess.Popen(
        [sys.executable, SERVER, "--transport", "http", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(15)
    raise RuntimeError(f"MCP http server did not start (exit code {proc.returncode}); run it by hand to see why")


def http_config(url: str, **server: Any) -> McpConfig:
    port = url.split(":")[2].split("/")[0]
    web: dict[str, Any] = {
        "transport": "http",
        "url": url,
        "secret_headers": {"X-Api-Key": "WEB_KEY"},
        "permissions": {"network": [f"127.0.0.1:{port}"]},
        "cost_per_call": 0.5,
    }
    web.update(server)
    return McpConfig.model_validate({"enabled": True, "servers": {"web": web}})


def shared_secret(tmp_path: Path, name: str, value: str) -> SecretStore:
    (tmp_path / "_shared").mkdir(exist_ok=True)
    (tmp_path / "_shared" / name).write_text(value)
    return SecretStore(directory=tmp_path, environ={})


async def test_http_lists_and_calls(http_server: str, tmp_path: Path) -> None:
    manager = make_manager(http_config(http_server), None, shared_secret(tmp_path, "WEB_KEY", "s3cret"))
    try:
        specs = await manager.list_tools("web")
        assert {s.id for s in specs} == {f"web.{name}" for name in ALL_TOOLS}
        assert all(s.cost_per_call == 0.5 and s.permissions.network for s in specs)
        assert await manager.call("web", "add", {"a": 2, "b": 3}) == {"result": 5}
        with pytest.raises(ToolFailure, match="the fail tool failed on purpose"):
            await manager.call("web", "fail", {})
    finally:
        await manager.close()


async def test_http_server_restart_between_calls(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    proc = await asyncio.to_thread(start_http_server, port)
    manager = make_manager(http_config(url, secret_headers={}), None)
    try:
        assert await manager.call("web", "add", {"a": 1, "b": 2}) == {"result": 3}
        proc.terminate()
        proc.wait(15)
        with pytest.raises(ToolFailure, match=r"MCP server 'web'.*ConnectError"):
            await manager.call("web", "add", {"a": 1, "b": 2})
        proc = await asyncio.to_thread(start_http_server, port)
        assert await manager.call("web", "add", {"a": 1, "b": 2}) == {"result": 3}
        assert await manager.call("web", "calls", {}) == {"result": 1}  # the new process ran it once
    finally:
        await manager.close()
        proc.terminate()
        proc.wait(15)


async def test_http_include_tools_filter(http_server: str, tmp_path: Path) -> None:
    config = http_config(http_server, include_tools=["add", "say hello"])
    manager = make_manager(config, None, shared_secret(tmp_path, "WEB_KEY", "s3cret"))
    try:
        assert sorted(s.id for s in await manager.list_tools("web")) == ["web.add", "web.say_hello"]
    finally:
        await manager.close()


async def test_http_wrong_secret_header_is_a_clear_error(http_server: str, tmp_path: Path) -> None:
    manager = make_manager(http_config(http_server), None, shared_secret(tmp_path, "WEB_KEY", "wrong"))
    try:
        with pytest.raises(AgentError, match=r"MCP server 'web' could not be connected: HTTP 401 Unauthorized"):
            await manager.list_tools("web")
    finally:
        await manager.close()
    missing = make_manager(http_config(http_server), None, SecretStore(environ={}))
    with pytest.raises(AgentError, match="secret 'WEB_KEY' is not configured"):
        await missing.list_tools("web")


async def test_http_host_not_in_permissions_is_refused_before_connecting(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        url = f"http://127.0.0.1:{port}/mcp"
        secrets = shared_secret(tmp_path, "WEB_KEY", "s3cret")
        for network in ([], ["api.example.com"], ["127.0.0.1:1"]):
            manager = make_manager(http_config(url, permissions={"network": network}), None, secrets)
            with pytest.raises(ToolDenied, match=f"host '127.0.0.1:{port}'.*not covered by its permissions.network"):
                await manager.list_tools("web")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked


# --- through the tool registry --------------------------------------------------------


def step(agent: str = "worker") -> StepContext:
    return StepContext(
        tenant="acme",
        run="run-1",
        step="s1",
        seq=1,
        attempt=1,
        delivery=1,
        agent_name=agent,
        config={"tools": ["files.*"]},
        payload={"input": None, "last": None},
    )


@pytest.fixture
async def runtime(sandbox: ProcessSandbox) -> AsyncIterator[ToolRuntime]:
    config = ToolsConfig(
        mcp=stdio_config(sandbox, timeout_s=2), tenant_policies={"default": TenantToolPolicy(allowed_tools=["files.*"])}
    )
    secrets = SecretStore(environ={})
    manager = McpManager(
        config.mcp, sandbox=sandbox, compiler=ExecProfileCompiler(config.tool_security), secrets=secrets
    )
    yield ToolRuntime(config, handlers={"mcp": McpToolHandler(manager)}, secrets=secrets, mcp=manager)
    await manager.close()


async def test_runtime_calls_an_mcp_tool(runtime: ToolRuntime) -> None:
    ctx = step()
    resolved = await runtime.resolve(ctx, ["files.*"])
    assert {s.id for s in resolved} == {f"files.{name}" for name in ALL_TOOLS}
    outcome = await runtime.call(ctx, "files.add", {"a": 2, "b": 3}, allowed=["files.*"])
    assert outcome.ok, outcome.error
    assert outcome.output == {"result": 5}
    record = outcome.record
    assert record["tool"] == "files.add" and record["outcome"] == "ok" and record["cost_usd"] == 0.01
    assert record["tenant"] == "acme" and record["input_hash"] and record["output_hash"]
    assert ctx.meter.tool_calls == [record]


async def test_runtime_rejects_bad_input_before_the_server(runtime: ToolRuntime) -> None:
    ctx = step()
    outcome = await runtime.call(ctx, "files.add", {"a": "two", "b": 3}, allowed=["files.*"])
    assert not outcome.ok and outcome.record["outcome"] == "invalid_input"
    assert "a: 'two' is not of type 'integer'" in (outcome.error or "")
    assert outcome.record["cost_usd"] == 0.0
    counted = await runtime.call(ctx, "files.calls", {}, allowed=["files.*"])
    assert counted.output == {"result": 0}  # add never ran on the server


async def test_runtime_denies_an_unlisted_tool(runtime: ToolRuntime) -> None:
    ctx = step("other")
    outcome = await runtime.call(ctx, "files.add", {"a": 2, "b": 3}, allowed=["search.*"])
    assert not outcome.ok and outcome.record["outcome"] == "denied"
    assert "not listed in agent 'other' tools" in (outcome.error or "")


async def test_runtime_records_server_errors_and_timeouts(runtime: ToolRuntime) -> None:
    ctx = step()
    failed = await runtime.call(ctx, "files.fail", {}, allowed=["files.*"])
    assert failed.record["outcome"] == "error" and "the fail tool failed on purpose" in (failed.error or "")
    slow = await runtime.call(ctx, "files.slow", {"seconds": 10}, allowed=["files.*"])
    assert slow.record["outcome"] == "timeout", slow.error
    ok = await runtime.call(ctx, "files.add", {"a": 1, "b": 1}, allowed=["files.*"])
    assert ok.output == {"result": 2}
