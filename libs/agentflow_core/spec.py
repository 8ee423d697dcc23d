"""Workflow specifications: pydantic v2 models, parsing from YAML/JSON, semantic checks.

``parse_workflow`` is the single entry point: it accepts YAML or JSON text (or an
already-decoded mapping) and returns a validated :class:`WorkflowSpec`, or raises
:class:`~agentflow_core.errors.ValidationFailed` whose ``details`` list every problem as
``{"loc": "planner.states.greet.agent", "msg": "..."}``.
"""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentflow_core.agent_configs import AGENT_CONFIGS
from agentflow_core.agent_plugins import plugin_config, plugin_types
from agentflow_core.canonical import content_hash
from agentflow_core.errors import CanonicalizationError, ValidationFailed
from agentflow_core.planners.common import Checks
from agentflow_core.planners.models import PLANNER_TYPES, PlannerSpec, normalize_planner
from agentflow_core.planners.registry import build_planner
from agentflow_core.tools import ToolSpec
from agentflow_core.tools_config import ToolsConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
QUEUE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class RetryPolicy(BaseModel):
    """Retries of a failed or timed-out step, with exponential backoff."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(1, ge=1, le=100)
    backoff_ms: int = Field(0, ge=0, le=3_600_000)
    backoff_multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max_backoff_ms: int = Field(300_000, ge=0, le=86_400_000)

    def delay_ms(self, failed_attempt: int) -> int:
        """Delay before the attempt that follows ``failed_attempt`` (1-based)."""
        delay = self.backoff_ms * self.backoff_multiplier ** (failed_attempt - 1)
        return int(min(delay, self.max_backoff_ms))


class AgentSpec(BaseModel):
    """An agent declaration; settings other than the common ones go to the agent."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1, max_length=128)
    #: what the agent is for (shown to the LLM planner, the dashboard, graphs)
    description: str | None = Field(None, max_length=2000)
    role: str | None = Field(None, max_length=2000)
    timeout_s: float | None = Field(None, gt=0, le=86_400)
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    queue: Annotated[str, Field(pattern=QUEUE_PATTERN)] = "default"

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


#: retries of internal steps (the LLM planner's planning call): transient model errors
INLINE_RETRY = RetryPolicy(max_attempts=3, backoff_ms=1000)


def inline_agent(definition: dict[str, Any]) -> AgentSpec:
    """The AgentSpec of an internal agent a planner defines inline (``StepRequest.inline_agent``)."""
    return AgentSpec.model_validate(
        {
            "type": definition["type"],
            "queue": definition.get("queue", "default"),
            "timeout_s": definition.get("timeout_s"),
            "retry": INLINE_RETRY,
            **definition.get("config", {}),
        }
    )


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    agents: dict[str, AgentSpec] = Field(min_length=1)
    planner: PlannerSpec
    #: tools declared by this workflow (besides the built-in and the tools-config ones)
    tools: list[ToolSpec] = Field(default_factory=list, max_length=200)

    def spec_hash(self) -> str:
        """Content hash of the normalized spec (defaults filled in)."""
        return content_hash(self.model_dump(mode="json"))


def _loc(parts: tuple[int | str, ...] | list[int | str]) -> str:
    # A discriminated union puts its tag in the path ("planner.fsm.states"); users wrote
    # "planner.states", so drop it.
    # Fallback plans nest the same way ("planner.fallback.dag.steps").
    kept: list[int | str] = []
    for part in parts:
        if isinstance(part, str) and part.startswith(("tagged-union[", "literal[")):
            continue  # pydantic's names for union members
        if kept and kept[-1] in ("planner", "fallback") and part in PLANNER_TYPES:
            continue
        kept.append(part)
    return ".".join(str(p) for p in kept)


def _config_errors(name: str, agent: AgentSpec) -> list[dict[str, str]]:
    """An agent's settings against its type's model (built in, or a plugin's ``Config``)."""
    model = AGENT_CONFIGS.get(agent.type)
    if model is None:
        if agent.type not in plugin_types():
            known = ", ".join(sorted({*AGENT_CONFIGS, *plugin_types()}))
            return [{"loc": f"agents.{name}.type", "msg": f"unknown agent type '{agent.type}' (known: {known})"}]
        try:
            model = plugin_config(agent.type)
        except Exception as exc:  # a broken plugin is the operator's problem; say which
            return [{"loc": f"agents.{name}.type", "msg": f"agent plugin '{agent.type}' failed to load: {exc}"}]
        if model is None:
            return []  # the plugin declares no settings model: it checks its own
    try:
        model.model_validate(agent.config)
    except ValidationError as exc:
        return [
            {"loc": ".".join(["agents", name, *(str(p) for p in e["loc"])]), "msg": e["msg"]}
            for e in exc.errors(include_url=False)
        ]
    return []


def agent_tool_ids(agent_type: str, config: dict[str, Any]) -> list[str]:
    """The tools an agent may call: an ``llm`` agent's ``tools``, a ``tool`` agent's ``tool``."""
    if agent_type == "llm":
        listed = config.get("tools") or []
        return [t for t in listed if isinstance(t, str)]
    if agent_type == "tool" and isinstance(config.get("tool"), str):
        return [config["tool"]]
    return []


def workflow_tools_of(spec: WorkflowSpec, agent_type: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Specs of the workflow-declared tools an agent names, for its step envelope."""
    if not spec.tools:
        return []
    wanted = set(agent_tool_ids(agent_type, config))
    return [t.model_dump(mode="json") for t in spec.tools if t.id in wanted]


def _tool_errors(spec: WorkflowSpec, tools: ToolsConfig | None) -> list[dict[str, str]]:
    """Every tool an agent names must be declared somewhere this control plane can see."""
    config = tools or ToolsConfig()
    known = set(config.declared())
    errors: list[dict[str, str]] = []
    for i, tool in enumerate(spec.tools):
        if tool.id in known:
            errors.append(
                {"loc": f"tools.{i}.id", "msg": f"tool '{tool.id}' is already declared (built in or tools config)"}
            )
        known.add(tool.id)
    for name, agent in spec.agents.items():
        for j, tool_id in enumerate(agent_tool_ids(agent.type, agent.config)):
            if tool_id in known or config.is_mcp_reference(tool_id):
                continue
            loc = f"agents.{name}.tools.{j}" if agent.type == "llm" else f"agents.{name}.tool"
            hint = ", ".join(sorted(known))
            errors.append({"loc": loc, "msg": f"unknown tool '{tool_id}' (declared: {hint})"})
    return errors


def _semantic_errors(spec: WorkflowSpec, tools: ToolsConfig | None = None) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = []
    for name, agent in spec.agents.items():
        errors.extend(_config_errors(name, agent))
    errors.extend(_tool_errors(spec, tools))

    if errors:
        return errors
    checks = Checks()
    build_planner(spec.planner, spec.agents, checks, "planner")
    return checks.errors


def load_document(text: str | bytes) -> Any:
    """Decode YAML or JSON (JSON is YAML) text into Python data."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationFailed(
            "workflow is not valid YAML or JSON", details=[{"loc": "body", "msg": str(exc)}]
        ) from exc


def parse_workflow(
    source: str | bytes | dict[str, Any], *, name: str | None = None, tools: ToolsConfig | None = None
) -> WorkflowSpec:
    """Validate a workflow from YAML/JSON text or a mapping.

    ``name`` (from the URL) fills a missing ``name`` and must match a present one.
    ``tools`` is the installation's tools config: agents may name its tools and MCP
    servers (without it, only built-in and workflow-declared tools are known).
    """
    data = load_document(source) if isinstance(source, str | bytes) else source
    if not isinstance(data, dict):
        raise ValidationFailed(
            "workflow must be a mapping",
            details=[{"loc": "body", "msg": "expected a mapping at the top level"}],
        )
    if name is not None:
        body_name = data.get("name")
        if body_name is None:
            data = {**data, "name": name}
        elif body_name != name:
            raise ValidationFailed(
                "workflow name does not match the URL",
                details=[{"loc": "name", "msg": f"'{body_name}' differs from '{name}' in the URL"}],
            )
    if "planner" in data:
        try:
            data = {**data, "planner": normalize_planner(data["planner"])}
        except ValueError as exc:
            raise ValidationFailed(
                "invalid workflow spec", details=[{"loc": "planner.definition", "msg": str(exc)}]
            ) from exc
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        # "fallback: <plan> | 'fail'": when the plan branch has errors, the "should be
        # 'fail'" alternative is noise.
        if len(errs) > 1:
            errs = [e for e in errs if not any(str(p).startswith("literal[") for p in e["loc"])] or errs
        details = [{"loc": _loc(e["loc"]), "msg": e["msg"]} for e in errs]
        raise ValidationFailed("invalid workflow spec", details=details) from exc
    errors = _semantic_errors(spec, tools)
    if errors:
        raise ValidationFailed("invalid workflow spec", details=errors)
    try:
        spec.spec_hash()
    except CanonicalizationError as exc:
        raise ValidationFailed("invalid workflow spec", details=[{"loc": "body", "msg": exc.message}]) from exc
    return spec
