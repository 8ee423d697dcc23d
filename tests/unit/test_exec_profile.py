"""ExecProfileCompiler: a pure function from (tool, tenant policy, defaults) to a profile."""

from __future__ import annotations

import pytest

from agentflow_core.exec_profile import (
    ExecProfileCompiler,
    TenantToolPolicy,
    ToolDenied,
    ToolSecurityDefaults,
    host_matches,
)
from agentflow_core.tools import BUILTIN_TOOLS, ToolSpec


def tool(**kw: object) -> ToolSpec:
    base: dict[str, object] = {"id": "t", "handler": {"kind": "command", "argv": ["true"]}}
    return ToolSpec.model_validate({**base, **kw})


OPEN = TenantToolPolicy(allowed_hosts=["api.example.com", "*.corp.example"], allowed_secrets=["KEY"])


def test_nothing_asked_nothing_granted() -> None:
    profile = ExecProfileCompiler().compile(tool(), TenantToolPolicy())
    assert profile.network == "none" and profile.allowed_hosts == ()
    assert profile.filesystem == "none"
    assert profile.secrets == ()
    assert profile.runtime == "process"


def test_limits_are_the_minimum_of_tool_policy_and_defaults() -> None:
    compiler = ExecProfileCompiler(ToolSecurityDefaults(memory_mb=512, cpu_seconds=10, timeout_s=30))
    t = tool(permissions={"memory_mb": 2048, "cpu_seconds": 5}, timeout_s=120)
    profile = compiler.compile(t, TenantToolPolicy(max_memory_mb=256, max_timeout_s=60))
    assert profile.memory_mb == 256  # policy is lowest
    assert profile.cpu_seconds == 5  # the tool asked for less than the default
    assert profile.timeout_s == 30  # default ceiling below tool and policy


def test_network_is_granted_only_where_policy_covers_it() -> None:
    t = tool(permissions={"network": ["api.example.com", "db.corp.example"]})
    profile = ExecProfileCompiler().compile(t, OPEN)
    assert profile.network == "allowlist"
    assert profile.allowed_hosts == ("api.example.com", "db.corp.example")
    with pytest.raises(ToolDenied, match=r"evil\.example"):
        ExecProfileCompiler().compile(tool(permissions={"network": ["evil.example"]}), OPEN)
    with pytest.raises(ToolDenied, match="allowed_hosts"):
        ExecProfileCompiler().compile(t, TenantToolPolicy())


def test_a_wildcard_ask_needs_a_wildcard_at_least_as_wide() -> None:
    compiler = ExecProfileCompiler()
    assert compiler.compile(tool(permissions={"network": ["*.corp.example"]}), OPEN).allowed_hosts == (
        "*.corp.example",
    )
    with pytest.raises(ToolDenied):
        compiler.compile(tool(permissions={"network": ["*.example.com"]}), OPEN)


def test_secrets_must_be_allowed_by_the_tenant() -> None:
    profile = ExecProfileCompiler().compile(tool(permissions={"secrets": ["KEY"]}), OPEN)
    assert profile.secrets == ("KEY",)
    with pytest.raises(ToolDenied, match="OTHER"):
        ExecProfileCompiler().compile(tool(permissions={"secrets": ["OTHER"]}), OPEN)


def test_filesystem_is_narrowed_by_policy() -> None:
    t = tool(permissions={"filesystem": "tmp"})
    assert ExecProfileCompiler().compile(t, TenantToolPolicy()).filesystem == "tmp"
    assert ExecProfileCompiler().compile(t, TenantToolPolicy(max_filesystem="read_only")).filesystem == "read_only"
    assert ExecProfileCompiler().compile(t, TenantToolPolicy(max_filesystem="none")).filesystem == "none"


def test_tool_allowlists() -> None:
    policy = TenantToolPolicy(allowed_tools=["code_executor", "files.*"])
    compiler = ExecProfileCompiler()
    compiler.compile(BUILTIN_TOOLS["code_executor"], policy)
    compiler.compile(tool(id="files.read"), policy)
    with pytest.raises(ToolDenied, match="tenant's allowed tools"):
        compiler.compile(tool(id="shell"), policy)
    with pytest.raises(ToolDenied, match="not listed in this agent"):
        compiler.compile(tool(id="files.read"), TenantToolPolicy(), agent_tools=["code_executor"])
    # an agent listing a whole MCP server's tools: the same wildcard as the tenant policy
    compiler.compile(tool(id="files.read"), TenantToolPolicy(), agent_tools=["files.*"])


def test_runtime_follows_the_security_level() -> None:
    defaults = ToolSecurityDefaults(runtime_by_level={"low": "process", "medium": "process", "high": "gvisor"})
    assert ExecProfileCompiler(defaults).compile(tool(security_level="high"), OPEN).runtime == "gvisor"
    assert ExecProfileCompiler(defaults).compile(tool(security_level="low"), OPEN).runtime == "process"


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.EXAMPLE.COM", True),
        ("api.example.com", "api.example.com.evil", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("api.example.com:443", "api.example.com:443", True),
        ("api.example.com:443", "api.example.com:80", False),
        ("api.example.com", "api.example.com:8443", True),
    ],
)
def test_host_matching(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected
