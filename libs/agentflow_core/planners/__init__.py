"""Pure, deterministic planners over JSON state.

Every planner implements :class:`Planner`: ``start(input)`` and
``on_result(state, result, input)`` return a :class:`Decision`. They perform no I/O and
read no clocks, so feeding a run's recorded results back reproduces its path exactly.
"""

from agentflow_core.planners.base import (
    Decision,
    Planner,
    RunOutcome,
    StepRequest,
    StepResult,
    planner_for,
)

__all__ = ["Decision", "Planner", "RunOutcome", "StepRequest", "StepResult", "planner_for"]
