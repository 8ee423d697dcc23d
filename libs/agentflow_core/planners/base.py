"""The planner interface shared by every planner type.

A planner is a pure function over JSON state: ``start``, ``on_result`` and ``on_timer``
take the state and an event and return a :class:`Decision`. Planners perform no I/O and
never read the clock: the engine passes ``now_ms`` in, so feeding the same events back
reproduces the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from agentflow_core.spec import WorkflowSpec

StepStatus = Literal["succeeded", "failed", "timeout", "rejected", "cancelled"]


@dataclass(frozen=True, slots=True)
class StepRequest:
    """A step the planner wants dispatched. ``seq`` is unique within the run.

    ``state`` names the plan element the step belongs to (FSM state, tree node, DAG
    step); ``agent`` is a declared agent, or an internal one (``__planner__``).
    """

    seq: int
    state: str
    agent: str
    payload: dict[str, Any]
    #: an agent definition for an agent the workflow does not declare (the LLM
    #: planner's ``__planner__`` step): ``{"type", "queue", "timeout_s", "config"}``
    inline_agent: dict[str, Any] | None = None


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
    """New planner state, steps to dispatch, steps to halt, and the outcome once it ends."""

    state: dict[str, Any]
    dispatch: list[StepRequest] = field(default_factory=list)
    outcome: RunOutcome | None = None
    #: True when the event did not belong to the current plan (a late result of a halted
    #: step, a timer not yet due) and the state is unchanged. An ignored decision still
    #: restates the timer the planner wants in ``wake_at_ms``.
    ignored: bool = False
    #: seqs of in-flight steps to halt: the engine marks them cancelled and tells the
    #: workers to stop them; their late results are recorded but never reach the planner.
    cancel: list[int] = field(default_factory=list)
    #: when to call ``on_timer`` next (epoch ms), or None for no timer. Every decision
    #: states the timer it wants; it replaces the previous one.
    wake_at_ms: int | None = None


class Planner(Protocol):
    def start(self, run_input: Any, now_ms: int) -> Decision: ...

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any, now_ms: int) -> Decision: ...

    def on_timer(self, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision: ...


def planner_for(spec: WorkflowSpec) -> Planner:
    """The compiled planner for a workflow spec; raises ValidationFailed when it is invalid."""
    from agentflow_core.planners.registry import compile_planner

    return compile_planner(spec)
