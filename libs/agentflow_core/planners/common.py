"""Pieces every planner shares: validation issue collection, run variables, policies.

Run variables live in the planner state under ``"vars"``::

    {"outputs": {node: output}, "agents": {agent: node}, "last": output, "last_node": node}

They are what expressions see (see :mod:`agentflow_core.expressions` for precedence).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentflow_core.errors import ValidationFailed
from agentflow_core.expressions import CompiledMapping, Expression, ExpressionError, Scope
from agentflow_core.planners.base import Decision, StepResult

DEFAULT_MAX_STEPS = 1000


class Checks:
    """Collects validation problems as ``{"loc", "msg"}`` and compiles expressions."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []

    def add(self, loc: str, msg: str) -> None:
        self.errors.append({"loc": loc, "msg": msg})

    def expr(self, loc: str, source: Any) -> Expression | None:
        try:
            return Expression(source)
        except ExpressionError as exc:
            where = f" at {exc.position}" if exc.position else ""
            self.add(loc, f"invalid expression {exc.source!r}{where}: {exc.message}")
            return None

    def mapping(self, loc: str, spec: Any) -> CompiledMapping | None:
        try:
            return CompiledMapping(spec)
        except ExpressionError as exc:
            where = f" at {exc.position}" if exc.position else ""
            self.add(loc, f"invalid expression {exc.source!r}{where}: {exc.message}")
            return None

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationFailed("invalid workflow spec", details=self.errors)


# --- run variables ----------------------------------------------------------------------


def empty_vars() -> dict[str, Any]:
    return {"outputs": {}, "agents": {}, "last": None, "last_node": None}


def with_output(variables: dict[str, Any], node: str, agent: str | None, output: Any) -> dict[str, Any]:
    """Variables after ``node`` (run by ``agent``) produced ``output`` (copy, not in place)."""
    outputs = {**variables["outputs"], node: output}
    agents = variables["agents"] if agent is None else {**variables["agents"], agent: node}
    return {"outputs": outputs, "agents": agents, "last": output, "last_node": node}


def scope_of(variables: dict[str, Any], run_input: Any, extras: dict[str, Any] | None = None) -> Scope:
    return Scope(
        input=run_input,
        outputs=variables["outputs"],
        last=variables["last"],
        agent_latest=variables["agents"],
        extras=extras or {},
    )


def runaway(max_steps: int) -> str:
    return f"run exceeded max_steps={max_steps} (runaway loop guard)"


# --- policies ---------------------------------------------------------------------------


class CriticalNodes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    critical_nodes: list[str] = Field(min_length=1)


#: AgentMap's run success policies: every node must succeed (``all_nodes``), only the
#: final node matters (``final_node``), or only the listed nodes (``critical_nodes``).
SuccessPolicy = Literal["all_nodes", "final_node"] | CriticalNodes

FailurePolicyName = Literal["fail", "conservative", "adaptive", "escalate", "human"]


class FailurePolicy(BaseModel):
    """What happens when a step fails for good (after its agent's own retries).

    ``fail``: follow the plan's error paths (FSM ``on_error``, BT failure, DAG failure).
    ``conservative``: run the failed step (FSM/DAG) or the tree (BT) again after
    ``backoff_ms`` x 2^n, at most ``max_replans`` times. ``escalate``: switch to the
    planner's ``fallback`` plan. ``adaptive``: ask an LLM planner for a new plan given the
    failure (``replanner``). ``human``: refused until human tasks exist.
    """

    model_config = ConfigDict(extra="forbid")

    policy: FailurePolicyName = "fail"
    max_replans: int = Field(2, ge=1, le=100)
    backoff_ms: int = Field(1000, ge=0, le=3_600_000)
    replanner: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"policy": value} if isinstance(value, str) else value

    def backoff(self, replans_so_far: int) -> int:
        return int(min(self.backoff_ms * 2**replans_so_far, 3_600_000))


class PlannerCommon(BaseModel):
    """Settings every planner type accepts."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(DEFAULT_MAX_STEPS, ge=1, le=1_000_000)
    #: the run's output: an expression or a mapping of expressions over the run variables
    output: Any = None
    on_failure: Annotated[FailurePolicy, Field(default_factory=FailurePolicy)]


def check_failure_policy(checks: Checks, policy: FailurePolicy, has_fallback: bool) -> None:
    if policy.policy == "human":
        checks.add(
            "planner.on_failure.policy",
            "'human' escalation needs human tasks, which AgentFlow does not have yet; "
            "use 'fail', 'conservative', 'escalate' or 'adaptive'",
        )
    if policy.policy == "escalate" and not has_fallback:
        checks.add("planner.on_failure.policy", "'escalate' needs a 'fallback' plan on the planner")
    if policy.policy == "adaptive" and not policy.replanner:
        checks.add("planner.on_failure.replanner", "'adaptive' needs a 'replanner' (an LLM planner's settings)")


# --- the base every planner implementation extends --------------------------------------


class PlannerImpl:
    """Base of the planner implementations.

    ``begin`` starts a plan that may continue an earlier one (a fallback taking over):
    ``seq0`` is the last seq already used, ``variables`` the run variables so far and
    ``failure`` the error that made the earlier plan give up. Every implementation keeps
    ``"seq"`` (last seq allocated) and ``"vars"`` (run variables) at the top of its state.
    """

    def begin(
        self,
        run_input: Any,
        now_ms: int,
        seq0: int,
        variables: dict[str, Any],
        failure: str | None,
    ) -> Decision:
        raise NotImplementedError

    def start(self, run_input: Any, now_ms: int) -> Decision:
        return self.begin(run_input, now_ms, 0, empty_vars(), None)

    def keep_outputs(self) -> None:
        """Keep every output in the run variables even if this plan's own expressions
        never read them (a fallback plan taking over may)."""

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any, now_ms: int) -> Decision:
        raise NotImplementedError

    def on_timer(self, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision:
        raise NotImplementedError
