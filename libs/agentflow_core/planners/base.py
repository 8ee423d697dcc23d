"""The planner interface shared by every planner type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from agentflow_core.spec import WorkflowSpec

StepStatus = Literal["succeeded", "failed", "timeout", "rejected", "cancelled"]


@dataclass(frozen=True, slots=True)
class StepRequest:
    """A step the planner wants dispatched. ``seq`` is unique within the run."""

    seq: int
    state: str
    agent: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StepResult:
    """The final outcome of a step (after the engine's retries), fed to the planner."""

    seq: int
    status: StepStatus
    output: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RunOutcome:
    status: Literal["succeeded", "failed"]
    output: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """New planner state, steps to dispatch, and the run's outcome once it ends."""

    state: dict[str, Any]
    dispatch: list[StepRequest] = field(default_factory=list)
    outcome: RunOutcome | None = None
    #: True when the result did not belong to the current plan (late, stale) and the
    #: state is unchanged.
    ignored: bool = False


class Planner(Protocol):
    def start(self, run_input: Any) -> Decision: ...

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any) -> Decision: ...


def planner_for(spec: WorkflowSpec) -> Planner:
    """The planner implementation for a validated workflow spec."""
    from agentflow_core.planners.fsm import FsmPlanner

    if spec.planner.type == "fsm":
        return FsmPlanner(spec)
    raise NotImplementedError(f"planner type {spec.planner.type!r}")  # pragma: no cover
