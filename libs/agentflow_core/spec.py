"""Workflow specifications: pydantic v2 models, parsing from YAML/JSON, semantic checks.

``parse_workflow`` is the single entry point: it accepts YAML or JSON text (or an
already-decoded mapping) and returns a validated :class:`WorkflowSpec`, or raises
:class:`~agentflow_core.errors.ValidationFailed` whose ``details`` list every problem as
``{"loc": "planner.states.greet.agent", "msg": "..."}``.
"""

from __future__ import annotations

from collections import deque
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentflow_core.canonical import content_hash
from agentflow_core.errors import CanonicalizationError, ValidationFailed

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
QUEUE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

#: Agent types every worker ships, with the settings each accepts.
BUILTIN_AGENT_TYPES: dict[str, dict[str, type]] = {
    "echo": {},
    "sleep": {"ms": int},
    "fail": {"times": int},
}


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
    timeout_s: float | None = Field(None, gt=0, le=86_400)
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    queue: Annotated[str, Field(pattern=QUEUE_PATTERN)] = "default"

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class FsmState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str
    on_success: str
    on_error: str | None = None


class FsmPlannerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["fsm"]
    initial_state: str
    states: dict[str, FsmState] = Field(min_length=1)
    final_states: list[str] = Field(min_length=1)
    max_steps: int = Field(1000, ge=1, le=1_000_000)


PlannerSpec = Annotated[FsmPlannerSpec, Field(discriminator="type")]


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    agents: dict[str, AgentSpec] = Field(min_length=1)
    planner: PlannerSpec

    def spec_hash(self) -> str:
        """Content hash of the normalized spec (defaults filled in)."""
        return content_hash(self.model_dump(mode="json"))


PLANNER_TYPES = ("fsm",)


def _loc(parts: tuple[int | str, ...] | list[int | str]) -> str:
    # A discriminated union puts its tag in the path ("planner.fsm.states"); users wrote
    # "planner.states", so drop it.
    if len(parts) > 1 and parts[0] == "planner" and parts[1] in PLANNER_TYPES:
        parts = (parts[0], *parts[2:])
    return ".".join(str(p) for p in parts)


def _semantic_errors(spec: WorkflowSpec) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = []

    for name, agent in spec.agents.items():
        allowed = BUILTIN_AGENT_TYPES.get(agent.type)
        if allowed is None:
            known = ", ".join(sorted(BUILTIN_AGENT_TYPES))
            errors.append(
                {
                    "loc": f"agents.{name}.type",
                    "msg": f"unknown agent type '{agent.type}' (known: {known})",
                }
            )
            continue
        for key, value in agent.config.items():
            expected = allowed.get(key)
            if expected is None:
                errors.append(
                    {
                        "loc": f"agents.{name}.{key}",
                        "msg": f"unknown setting for a '{agent.type}' agent",
                    }
                )
            elif not isinstance(value, expected) or isinstance(value, bool) or (isinstance(value, int) and value < 0):
                errors.append({"loc": f"agents.{name}.{key}", "msg": "must be a non-negative integer"})

    fsm = spec.planner
    finals = set(fsm.final_states)
    for dup in finals & set(fsm.states):
        errors.append({"loc": "planner.final_states", "msg": f"'{dup}' is both a state and a final state"})
    if fsm.initial_state not in fsm.states:
        errors.append({"loc": "planner.initial_state", "msg": f"unknown state '{fsm.initial_state}'"})
    targets = set(fsm.states) | finals
    for name, state in fsm.states.items():
        if state.agent not in spec.agents:
            errors.append({"loc": f"planner.states.{name}.agent", "msg": f"unknown agent '{state.agent}'"})
        for field in ("on_success", "on_error"):
            target = getattr(state, field)
            if target is not None and target not in targets:
                errors.append({"loc": f"planner.states.{name}.{field}", "msg": f"unknown state '{target}'"})
    if errors:
        return errors

    # Reachability: every state and every final state must be reachable from the start.
    seen = {fsm.initial_state}
    queue = deque([fsm.initial_state])
    while queue:
        node = fsm.states.get(queue.popleft())
        if node is None:
            continue
        for target in (node.on_success, node.on_error):
            if target is not None and target not in seen:
                seen.add(target)
                queue.append(target)
    for name in fsm.states:
        if name not in seen:
            errors.append(
                {
                    "loc": f"planner.states.{name}",
                    "msg": "state is unreachable from the initial state",
                }
            )
    for name in fsm.final_states:
        if name not in seen:
            errors.append({"loc": "planner.final_states", "msg": f"final state '{name}' is unreachable"})
    return errors


def load_document(text: str | bytes) -> Any:
    """Decode YAML or JSON (JSON is YAML) text into Python data."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationFailed(
            "workflow is not valid YAML or JSON", details=[{"loc": "body", "msg": str(exc)}]
        ) from exc


def parse_workflow(source: str | bytes | dict[str, Any], *, name: str | None = None) -> WorkflowSpec:
    """Validate a workflow from YAML/JSON text or a mapping.

    ``name`` (from the URL) fills a missing ``name`` and must match a present one.
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
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        details = [{"loc": _loc(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)]
        raise ValidationFailed("invalid workflow spec", details=details) from exc
    errors = _semantic_errors(spec)
    if errors:
        raise ValidationFailed("invalid workflow spec", details=errors)
    try:
        spec.spec_hash()
    except CanonicalizationError as exc:
        raise ValidationFailed("invalid workflow spec", details=[{"loc": "body", "msg": exc.message}]) from exc
    return spec
