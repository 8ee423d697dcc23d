"""Tool declarations: what a tool is, what it may touch, what it costs, how often it may run.

A tool is declared in the tools config file (shared by control plane and workers) or in a
workflow's ``tools:`` section. Nothing is granted by default: a tool that declares no
``permissions`` runs with no network, no filesystem beyond nothing at all, and no secrets;
an agent may call only the tools listed on it; the tenant's policy narrows further (see
:mod:`agentflow_core.exec_profile`).

Pure data and validation only: no I/O, so it is usable from the control plane (at
registration), the worker (at call time) and tests alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TOOL_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$"
#: host, host:port, or *.suffix (one leading wildcard label)
HOST_PATTERN = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:\d{1,5})?$")

SecurityLevel = Literal["low", "medium", "high"]
FilesystemAccess = Literal["none", "read_only", "tmp"]
#: strictness order: a narrower grant is the smaller one
FILESYSTEM_ORDER: dict[str, int] = {"none": 0, "read_only": 1, "tmp": 2}

_PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``count`` calls per ``period_s`` seconds, across every worker."""

    count: int
    period_s: int

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s}s"


def parse_rate_limit(text: str) -> RateLimit:
    """``"100/hour"``, ``"10/min"``, ``"5/30s"`` → :class:`RateLimit`; ValueError names the problem."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", text.lower())
    if not match:
        raise ValueError(f"rate limit '{text}' must look like '100/hour', '10/min' or '5/30s'")
    count, multiple, unit = int(match[1]), int(match[2] or 1), match[3].rstrip("s") or "s"
    seconds = _PERIODS.get(unit) or _PERIODS.get(match[3])
    if seconds is None:
        raise ValueError(f"rate limit '{text}': unknown period '{match[3]}' (use s, min, hour or day)")
    if count < 1 or multiple < 1:
        raise ValueError(f"rate limit '{text}' must allow at least one call per period")
    return RateLimit(count, seconds * multiple)


def check_hosts(hosts: list[str]) -> list[str]:
    """Validator of host allowlists: ``api.example.com``, ``host:443``, ``*.example.com``."""
    for host in hosts:
        if not HOST_PATTERN.match(host):
            raise ValueError(f"'{host}' is not a host name, host:port or *.domain pattern")
    return hosts


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse a schema that is not valid JSON Schema (draft 2020-12 unless ``$schema`` says)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from exc
    return schema


def schema_errors(schema: dict[str, Any], value: Any, *, limit: int = 10) -> list[str]:
    """Every way ``value`` breaks ``schema``, as ``"path: message"`` lines (empty: valid)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    found: list[str] = []
    for error in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        found.append(f"{where}: {error.message}")
        if len(found) >= limit:
            break
    return found


class ToolPermissions(BaseModel):
    """What a tool asks for. Each grant is still narrowed by the tenant policy."""

    model_config = ConfigDict(extra="forbid")

    #: hosts the tool may connect to (``api.example.com``, ``*.example.com``, ``host:443``);
    #: empty = no network at all
    network: list[str] = Field(default_factory=list, max_length=100)
    filesystem: FilesystemAccess = "none"
    #: named secrets handed to the tool (as environment variables), looked up per tenant
    secrets: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]] = Field(
        default_factory=list, max_length=50
    )
    cpu_seconds: float | None = Field(None, gt=0, le=3600)
    memory_mb: int | None = Field(None, ge=16, le=65536)

    _hosts = field_validator("network")(check_hosts)


def _both_languages() -> list[Literal["python", "bash"]]:
    return ["python", "bash"]


class CodeExecutorHandler(BaseModel):
    """The built-in ``code_executor``: runs Python or bash code in the sandbox."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["code_executor"]
    languages: list[Literal["python", "bash"]] = Field(default_factory=_both_languages, min_length=1)


class CommandHandler(BaseModel):
    """A program run in the sandbox: the tool input as JSON on stdin, its output as JSON on stdout."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["command"]
    argv: list[str] = Field(min_length=1, max_length=100)


class McpHandler(BaseModel):
    """A tool of a configured MCP server (``tools/call`` routed through the registry)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mcp"]
    server: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    tool: str = Field(min_length=1, max_length=256)


ToolHandler = Annotated[CodeExecutorHandler | CommandHandler | McpHandler, Field(discriminator="kind")]


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=TOOL_ID_PATTERN)
    description: str = Field("", max_length=4000)
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    output_schema: dict[str, Any] | None = None
    handler: ToolHandler
    permissions: ToolPermissions = Field(default_factory=ToolPermissions)
    #: dollars charged per call (recorded with each call; budgets come later)
    cost_per_call: float = Field(0.0, ge=0, le=1_000_000)
    #: e.g. "100/hour", enforced per tenant across every worker
    rate_limit: str | None = None
    timeout_s: float = Field(30.0, gt=0, le=3600)
    security_level: SecurityLevel = "medium"

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if schema is None else check_json_schema(schema)

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, text: str | None) -> str | None:
        if text is not None:
            parse_rate_limit(text)
        return text

    @property
    def limit(self) -> RateLimit | None:
        return parse_rate_limit(self.rate_limit) if self.rate_limit else None


#: Tools every installation has. ``code_executor`` needs the ``tmp`` filesystem grant to
#: have anywhere to write; it gets no network.
BUILTIN_TOOLS: dict[str, ToolSpec] = {
    "code_executor": ToolSpec(
        id="code_executor",
        description="Run a short Python or bash program in an isolated sandbox and return its output.",
        input_schema={
            "type": "object",
            "properties": {
                "language": {"enum": ["python", "bash"]},
                "code": {"type": "string", "maxLength": 200_000},
                "stdin": {"type": "string", "maxLength": 1_000_000},
            },
            "required": ["language", "code"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {
                "stdout": {"type": "string"},
                "stderr": {"type": "string"},
                "exit_code": {"type": "integer"},
                "truncated": {"type": "boolean"},
                "reason": {"type": ["string", "null"]},
            },
            "required": ["stdout", "stderr", "exit_code"],
        },
        handler=CodeExecutorHandler(kind="code_executor"),
        permissions=ToolPermissions(filesystem="tmp"),
        timeout_s=30.0,
        security_level="high",
    )
}


def tool_listed(tool_id: str, entries: list[str]) -> bool:
    """``tool_id`` is one of ``entries``, or under a ``server.*`` entry (all of an MCP server's tools)."""
    return any(e == tool_id or (e.endswith(".*") and tool_id.startswith(e[:-1])) for e in entries)


def tool_as_function(spec: ToolSpec) -> dict[str, Any]:
    """The OpenAI-style function declaration of a tool (what an LLM is shown)."""
    return {
        "type": "function",
        "function": {
            "name": spec.id.replace(".", "__"),
            "description": spec.description,
            "parameters": spec.input_schema,
        },
    }


def function_name_to_tool_id(name: str) -> str:
    """Inverse of the name mangling in :func:`tool_as_function` (dots are not allowed there)."""
    return name.replace("__", ".")
