"""The tools config file: tools, MCP servers, tenant policies and sandbox ceilings.

One YAML file (``AGENTFLOW_TOOLS_FILE``) read by the control plane (to validate the tool
lists of workflows at registration) and by every worker (to run them)::

    tools:
      - id: lookup_weather
        description: Current weather for a city
        handler: {kind: command, argv: [python3, /opt/tools/weather.py]}
        input_schema: {type: object, properties: {city: {type: string}}, required: [city]}
        permissions: {network: [api.weather.example], secrets: [WEATHER_KEY]}
        rate_limit: 100/hour
        cost_per_call: 0.001
    mcp:
      enabled: true
      servers:
        files: {transport: stdio, command: [python3, -m, my_mcp_server]}
    tool_security: {memory_mb: 512, cpu_seconds: 10}
    tenant_policies:
      default: {allowed_hosts: []}
      acme: {allowed_hosts: [api.weather.example], allowed_secrets: [WEATHER_KEY]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentflow_core.errors import ConfigurationError
from agentflow_core.exec_profile import TenantToolPolicy, ToolSecurityDefaults
from agentflow_core.tools import BUILTIN_TOOLS, SecurityLevel, ToolPermissions, ToolSpec


class McpServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transport: Literal["stdio", "http"]
    #: stdio: the server program and its arguments (run inside the process sandbox)
    command: list[str] | None = Field(None, min_length=1)
    #: http: the streamable-HTTP endpoint, e.g. http://127.0.0.1:8000/mcp
    url: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    #: header name -> secret name, for http servers
    secret_headers: dict[str, str] = Field(default_factory=dict)
    #: what the server's tools may do: applied to every tool it lists (stdio: the sandbox
    #: of the server process; http: the hosts the worker may reach)
    permissions: ToolPermissions = Field(default_factory=ToolPermissions)
    security_level: SecurityLevel = "medium"
    cost_per_call: float = Field(0.0, ge=0)
    rate_limit: str | None = None
    timeout_s: float = Field(30.0, gt=0, le=3600)
    #: only these tools of the server are exposed (None = all it lists)
    include_tools: list[str] | None = None

    @model_validator(mode="after")
    def _transport_fields(self) -> McpServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError("a stdio MCP server needs 'command'")
        if self.transport == "http" and not self.url:
            raise ValueError("an http MCP server needs 'url'")
        return self


class McpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    servers: dict[str, McpServerConfig] = Field(default_factory=dict)


class ToolsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tools: list[ToolSpec] = Field(default_factory=list)
    mcp: McpConfig = Field(default_factory=McpConfig)
    tool_security: ToolSecurityDefaults = Field(default_factory=ToolSecurityDefaults)
    tenant_policies: dict[str, TenantToolPolicy] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> ToolsConfig:
        seen: set[str] = set(BUILTIN_TOOLS)
        for tool in self.tools:
            if tool.id in seen:
                raise ValueError(f"tool id '{tool.id}' is declared twice (or shadows a built-in tool)")
            seen.add(tool.id)
        return self

    def policy_for(self, tenant: str) -> TenantToolPolicy:
        return self.tenant_policies.get(tenant) or self.tenant_policies.get("default") or TenantToolPolicy()

    def declared(self) -> dict[str, ToolSpec]:
        """Built-in and config-declared tools by id (MCP tools are discovered at run time)."""
        return {**BUILTIN_TOOLS, **{t.id: t for t in self.tools}}

    def is_mcp_reference(self, tool_id: str) -> bool:
        """``server.tool`` (or ``server.*``) naming a configured MCP server."""
        server, dot, _ = tool_id.partition(".")
        return bool(dot) and self.mcp.enabled and server in self.mcp.servers


def load_tools_config(path: str | Path | None) -> ToolsConfig:
    """Read the tools file; no path means built-in tools only. A bad file refuses to start."""
    if not path:
        return ToolsConfig()
    try:
        data: Any = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read tools config {path}: {exc}") from exc
    try:
        return ToolsConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid tools config {path}: {problems}") from exc
