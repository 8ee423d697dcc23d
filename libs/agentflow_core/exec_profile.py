"""From "what a tool asks for" to "what the sandbox will allow": the ExecProfile.

:class:`ExecProfileCompiler` is a pure function of three inputs:

* the tool's :class:`~agentflow_core.tools.ToolSpec` (its permissions, timeout, level),
* the tenant's :class:`TenantToolPolicy` (which tools, hosts, secrets and how much),
* the installation's :class:`ToolSecurityDefaults` (ceilings and the runtime per level).

Every grant is the *intersection* of what the tool asks for and what the policy allows;
every limit is the *minimum* of the three. Nothing widens: a tool that asks for nothing
gets no network, no filesystem and no secrets. A tool the tenant may not use is refused
here with :class:`ToolDenied`, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agentflow_core.errors import Forbidden
from agentflow_core.tools import FILESYSTEM_ORDER, FilesystemAccess, SecurityLevel, ToolSpec, tool_listed

Runtime = Literal["process", "docker", "gvisor", "in_worker"]


class ToolDenied(Forbidden):
    """The policy does not let this tenant (or agent) use this tool, host or secret."""

    code = "tool_denied"


class TenantToolPolicy(BaseModel):
    """What one tenant's tools may do. The default policy allows every declared tool, no
    network and no secrets: hosts and secrets must be allowed explicitly."""

    model_config = ConfigDict(extra="forbid")

    #: tool ids (or ``server.*`` for every tool of an MCP server); None = any declared tool
    allowed_tools: list[str] | None = None
    #: hosts tools may reach (same patterns as tool permissions); empty = no network
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_secrets: list[str] = Field(default_factory=list)
    max_filesystem: FilesystemAccess = "tmp"
    max_memory_mb: int | None = Field(None, ge=16)
    max_cpu_seconds: float | None = Field(None, gt=0)
    max_timeout_s: float | None = Field(None, gt=0)

    def allows_tool(self, tool_id: str) -> bool:
        return self.allowed_tools is None or tool_listed(tool_id, self.allowed_tools)


def _process_everywhere() -> dict[SecurityLevel, Runtime]:
    return {"low": "process", "medium": "process", "high": "process"}


class ToolSecurityDefaults(BaseModel):
    """Installation-wide ceilings (``tool_security`` in the tools config)."""

    model_config = ConfigDict(extra="forbid")

    memory_mb: int = Field(512, ge=16)
    cpu_seconds: float = Field(10.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    output_bytes: int = Field(1_000_000, ge=1024)
    max_processes: int = Field(64, ge=1)
    max_open_files: int = Field(256, ge=16)
    max_file_mb: int = Field(64, ge=1)
    #: which sandbox runs a tool of each security level; ``in_worker`` is only for tools
    #: that run no code of their own (remote MCP servers)
    runtime_by_level: dict[SecurityLevel, Runtime] = Field(default_factory=_process_everywhere)


@dataclass(frozen=True, slots=True)
class ExecProfile:
    """Everything a sandbox backend needs to know to run one tool call, nothing more."""

    runtime: Runtime
    network: Literal["none", "allowlist"]
    allowed_hosts: tuple[str, ...]
    filesystem: FilesystemAccess
    cpu_seconds: float
    memory_mb: int
    timeout_s: float
    output_bytes: int
    max_processes: int
    max_open_files: int
    max_file_mb: int
    secrets: tuple[str, ...] = field(default=())
    #: host paths shown read-only at the same path. Set only by the worker for programs
    #: the operator configured (a stdio MCP server's script and libraries), never from a
    #: tool's permissions: the compiler always leaves it empty.
    ro_binds: tuple[str, ...] = field(default=())


def host_matches(pattern: str, host: str) -> bool:
    """``*.example.com`` matches ``a.example.com`` (not ``example.com``); a port must match
    when the pattern names one."""
    p_host, _, p_port = pattern.partition(":")
    h_host, _, h_port = host.partition(":")
    if p_port and p_port != h_port:
        return False
    p_host, h_host = p_host.lower(), h_host.lower()
    if p_host.startswith("*."):
        return h_host.endswith(p_host[1:]) and h_host != p_host[2:]
    return p_host == h_host


def _narrow_hosts(asked: list[str], allowed: list[str]) -> tuple[str, ...]:
    """The asked-for hosts that some allowed pattern covers (a wildcard ask is kept only
    when an allowed pattern is at least as wide)."""
    kept = []
    for host in asked:
        probe = host[2:] if host.startswith("*.") else host
        for pattern in allowed:
            if pattern == host or (not host.startswith("*.") and host_matches(pattern, probe)):
                kept.append(host)
                break
            if host.startswith("*.") and pattern.startswith("*.") and host_matches(pattern, "x." + probe):
                kept.append(host)
                break
    return tuple(kept)


def _min(*values: float | int | None) -> float:
    return min(v for v in values if v is not None)


class ExecProfileCompiler:
    """Pure: ``compile(tool, policy)`` → :class:`ExecProfile`, or :class:`ToolDenied`."""

    def __init__(self, defaults: ToolSecurityDefaults | None = None) -> None:
        self.defaults = defaults or ToolSecurityDefaults()

    def compile(self, tool: ToolSpec, policy: TenantToolPolicy, *, agent_tools: list[str] | None = None) -> ExecProfile:
        if agent_tools is not None and not tool_listed(tool.id, agent_tools):
            raise ToolDenied(f"tool '{tool.id}' is not listed in this agent's tools (deny by default)")
        if not policy.allows_tool(tool.id):
            raise ToolDenied(f"tool '{tool.id}' is not in the tenant's allowed tools")
        asked = tool.permissions
        denied_secrets = [s for s in asked.secrets if s not in policy.allowed_secrets]
        if denied_secrets:
            # A missing secret would fail the call later with a vaguer error; say it now.
            raise ToolDenied(
                f"tool '{tool.id}' needs secret(s) {', '.join(denied_secrets)} that the tenant policy does not allow"
            )
        hosts = _narrow_hosts(asked.network, policy.allowed_hosts)
        missing = [h for h in asked.network if h not in hosts]
        if missing:
            raise ToolDenied(
                f"tool '{tool.id}' asks for network access to {', '.join(missing)}, "
                "which the tenant policy's allowed_hosts do not cover"
            )
        filesystem = min(asked.filesystem, policy.max_filesystem, key=FILESYSTEM_ORDER.__getitem__)
        d = self.defaults
        return ExecProfile(
            runtime=d.runtime_by_level[tool.security_level],
            network="allowlist" if hosts else "none",
            allowed_hosts=hosts,
            filesystem=filesystem,
            cpu_seconds=_min(asked.cpu_seconds, policy.max_cpu_seconds, d.cpu_seconds),
            memory_mb=int(_min(asked.memory_mb, policy.max_memory_mb, d.memory_mb)),
            timeout_s=_min(tool.timeout_s, policy.max_timeout_s, d.timeout_s),
            output_bytes=d.output_bytes,
            max_processes=d.max_processes,
            max_open_files=d.max_open_files,
            max_file_mb=d.max_file_mb,
            secrets=tuple(asked.secrets),
        )
