"""Finite-state-machine planner: one step at a time, transitions on success or error.

State: ``{"current": <state name>, "seq": <seq of the in-flight step>}``.

A transition taken through ``on_error`` into a final state ends the run as ``failed``
(carrying the step's error); reaching a final state through ``on_success`` ends it as
``succeeded``. A failed step with no ``on_error`` fails the run. The run's output is the
last step's output.
"""

from __future__ import annotations

from typing import Any

from agentflow_core.planners.base import Decision, RunOutcome, StepRequest, StepResult
from agentflow_core.spec import FsmPlannerSpec, WorkflowSpec


class FsmPlanner:
    def __init__(self, spec: WorkflowSpec) -> None:
        self._fsm: FsmPlannerSpec = spec.planner
        self._finals = frozenset(self._fsm.final_states)

    def _dispatch(self, state_name: str, seq: int, run_input: Any, last: Any) -> Decision:
        if seq > self._fsm.max_steps:
            return Decision(
                state={"current": state_name, "seq": seq - 1},
                outcome=RunOutcome(
                    "failed",
                    last,
                    f"run exceeded max_steps={self._fsm.max_steps} (runaway loop guard)",
                ),
            )
        agent = self._fsm.states[state_name].agent
        return Decision(
            state={"current": state_name, "seq": seq},
            dispatch=[StepRequest(seq, state_name, agent, {"input": run_input, "last": last})],
        )

    def start(self, run_input: Any) -> Decision:
        return self._dispatch(self._fsm.initial_state, 1, run_input, None)

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any) -> Decision:
        current = state.get("current")
        if result.seq != state.get("seq") or current not in self._fsm.states:
            return Decision(state=state, ignored=True)
        node = self._fsm.states[current]
        ok = result.status == "succeeded"
        target = node.on_success if ok else node.on_error
        if target is None:
            error = result.error or f"step '{current}' {result.status}"
            return Decision(state={**state, "current": None}, outcome=RunOutcome("failed", result.output, error))
        if target in self._finals:
            final = {"current": target, "seq": result.seq}
            if ok:
                return Decision(state=final, outcome=RunOutcome("succeeded", result.output))
            error = result.error or f"step '{current}' {result.status}"
            return Decision(state=final, outcome=RunOutcome("failed", result.output, error))
        return self._dispatch(target, result.seq + 1, run_input, result.output)
