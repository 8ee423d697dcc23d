"""Planner specifications (pydantic v2): FSM, behavior tree, DAG pipeline, guarded LLM.

These models check shapes; the compile step of each planner (``planners/<type>.py``)
checks meaning (targets, reachability, expressions, thresholds) and reports problems
with the same ``{"loc", "msg"}`` details.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentflow_core.planners.common import PlannerCommon, SuccessPolicy

NODE_NAME = r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$"
QUEUE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

#: accepted spellings of planner types, normalised before validation
PLANNER_ALIASES = {"bt": "behavior_tree", "behaviour_tree": "behavior_tree", "pipeline": "dag"}
PLANNER_TYPES = ("fsm", "behavior_tree", "dag", "llm")

# --- FSM --------------------------------------------------------------------------------


class FsmTransition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    condition: str
    target: str


class FinalState(BaseModel):
    """A final state: the run's ``status`` when it is reached (default: succeeded, unless
    reached through ``on_error``/``on_timeout``) and an optional ``output`` expression."""

    model_config = ConfigDict(extra="forbid")

    output: Any = None
    status: Literal["succeeded", "failed"] | None = None


class FsmState(BaseModel):
    """A state runs ``agent`` (default: the agent named like the state), or is a pure
    decision (``condition`` + ``on_true``/``on_false``) that runs nothing."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = None
    description: str | None = None
    input: Any = None
    output: Any = None
    on_success: str | None = None
    on_error: str | None = None
    on_timeout: str | None = None
    conditional_transitions: list[FsmTransition] = Field(default_factory=list)
    condition: str | None = None
    on_true: str | None = None
    on_false: str | None = None
    #: a named routing function (AgentMap's ``func:name``), from the
    #: ``agentflow.routing`` entry-point group: ``(output, scope) -> state name``
    router: str | None = None
    max_visits: int | None = Field(None, ge=1, le=1_000_000)


class FsmPlannerSpec(PlannerCommon):
    type: Literal["fsm"]
    initial_state: str
    states: dict[str, FsmState] = Field(min_length=1)
    final_states: list[str] | dict[str, FinalState] = Field(min_length=1)
    success_policy: SuccessPolicy = "final_node"
    fallback: PlannerSpec | Literal["fail"] | None = None

    def finals(self) -> dict[str, FinalState]:
        if isinstance(self.final_states, dict):
            return self.final_states
        return {name: FinalState() for name in self.final_states}


# --- behavior tree ----------------------------------------------------------------------

BtControl = Literal[
    "sequence",
    "sequence_with_memory",
    "reactive_sequence",
    "fallback",
    "selector",
    "reactive_fallback",
    "parallel",
    "conditional_selector",
]
BtLeaf = Literal["action", "condition"]
BtDecorator = Literal["inverter", "force_success", "force_failure", "retry", "repeat", "timeout"]
BT_CONTROLS: tuple[str, ...] = BtControl.__args__  # type: ignore[attr-defined]
BT_DECORATORS: tuple[str, ...] = BtDecorator.__args__  # type: ignore[attr-defined]


class BtBranch(BaseModel):
    """One entry of a ``conditional_selector``: ``{expression, child}`` or ``{default: true, child}``."""

    model_config = ConfigDict(extra="forbid")

    expression: str | None = None
    default: bool = False
    child: BtNode


class BtNode(BaseModel):
    """One node; which fields apply depends on ``type`` (checked when compiling)."""

    model_config = ConfigDict(extra="forbid")

    type: BtControl | BtLeaf | BtDecorator
    name: Annotated[str, Field(pattern=NODE_NAME)] | None = None
    description: str | None = None
    # controls
    children: list[BtNode] | None = None
    # decorators
    child: BtNode | None = None
    # action
    agent: str | None = None
    input: Any = None
    output: Any = None
    # condition
    check: str | None = None
    # parallel
    success_threshold: int | None = None
    failure_threshold: int | None = None
    success_policy: Literal["all", "one"] | int | None = None
    # conditional_selector
    conditions: list[BtBranch] | None = None
    # retry / repeat / timeout
    max_attempts: int | None = Field(None, ge=1, le=10_000)
    times: int | None = Field(None, ge=1, le=1_000_000)
    seconds: float | None = Field(None, gt=0, le=30 * 86_400)


class BtPlannerSpec(PlannerCommon):
    type: Literal["behavior_tree"]
    root: BtNode
    fallback: PlannerSpec | Literal["fail"] | None = None


# --- DAG pipeline -----------------------------------------------------------------------


class DagStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NODE_NAME)] | None = None
    agent: str | None = None
    description: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    #: when the step may run: ``all_success`` (default; a failed dependency skips it) or
    #: ``all_done`` (whatever the dependencies' outcome; the condition decides)
    trigger: Literal["all_success", "all_done"] = "all_success"
    #: CEL text, or the seed's operator form ``{operator: equals, left: "$a.result", right: 1}``
    condition: str | dict[str, Any] | None = None
    input: Any = None
    output: Any = None


class DagPlannerSpec(PlannerCommon):
    type: Literal["dag"]
    steps: dict[str, DagStep] = Field(min_length=1)
    #: steps in flight at once (0: no limit)
    max_concurrency: int = Field(0, ge=0, le=10_000)
    success_policy: SuccessPolicy = "all_nodes"
    fallback: PlannerSpec | Literal["fail"] | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _list_form(cls, value: Any) -> Any:
        # The TAgent list form: [{name: fetch, ...}, ...] keeps its order.
        if isinstance(value, list):
            out: dict[str, Any] = {}
            for i, item in enumerate(value):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    raise ValueError(f"steps[{i}] needs a 'name' in the list form")
                if item["name"] in out:
                    raise ValueError(f"steps[{i}]: duplicate step name '{item['name']}'")
                out[item["name"]] = item
            return out
        return value


# --- guarded LLM planner ----------------------------------------------------------------


class LlmModel(BaseModel):
    """Model settings of the planning call (an OpenAI-compatible chat completions API)."""

    model_config = ConfigDict(extra="forbid")

    provider: str = "openai"
    model: str = Field(min_length=1)
    api_base: str | None = None
    #: name of the worker environment variable holding the API key (never the key itself)
    api_key_env: str | None = None
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(2048, ge=1, le=200_000)


class LlmPlannerSpec(PlannerCommon):
    type: Literal["llm"]
    model: LlmModel
    max_steps: int = Field(20, ge=1, le=1000)
    #: prompt template; ``{goal}``, ``{input}``, ``{agents}``, ``{max_steps}``, ``{schema}`` are filled in
    template: str | None = None
    #: extra JSON schema the plan must also satisfy
    plan_schema: dict[str, Any] | None = Field(None, alias="schema")
    #: agents the plan may use (default: every declared agent)
    agents: list[str] | None = None
    queue: Annotated[str, Field(pattern=QUEUE_PATTERN)] = "default"
    timeout_s: float = Field(120, gt=0, le=3600)
    max_concurrency: int = Field(0, ge=0, le=10_000)
    fallback: PlannerSpec | Literal["fail"] = "fail"

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


PlannerSpec = Annotated[
    FsmPlannerSpec | BtPlannerSpec | DagPlannerSpec | LlmPlannerSpec,
    Field(discriminator="type"),
]

for _model in (FsmPlannerSpec, BtBranch, BtNode, BtPlannerSpec, DagPlannerSpec, LlmPlannerSpec):
    _model.model_rebuild()


def normalize_planner(data: Any) -> Any:
    """Accept the seed's ``definition: |`` form and type aliases (recursively for fallbacks).

    Raises ValueError with a message for a definition that is not a YAML mapping.
    """
    import yaml

    if not isinstance(data, dict):
        return data
    out = dict(data)
    if "definition" in out:
        definition = out.pop("definition")
        if isinstance(definition, str):
            try:
                definition = yaml.safe_load(definition)
            except yaml.YAMLError as exc:
                raise ValueError(f"definition is not valid YAML: {exc}") from exc
        if not isinstance(definition, dict):
            raise ValueError("definition must be a mapping (or YAML text of one)")
        for key, value in definition.items():
            out.setdefault(key, value)
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = PLANNER_ALIASES.get(kind, kind)
    if isinstance(out.get("fallback"), dict):
        out["fallback"] = normalize_planner(out["fallback"])
    return out
