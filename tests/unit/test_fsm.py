from __future__ import annotations

from typing import Any

from agentflow_core.planners import Decision, StepResult, planner_for
from agentflow_core.spec import parse_workflow

SPEC = parse_workflow(
    {
        "name": "fsm",
        "agents": {"a": {"type": "echo"}, "b": {"type": "echo"}, "fix": {"type": "echo"}},
        "planner": {
            "type": "fsm",
            "initial_state": "first",
            "states": {
                "first": {"agent": "a", "on_success": "second", "on_error": "repair"},
                "repair": {"agent": "fix", "on_success": "second"},
                "second": {"agent": "b", "on_success": "done", "on_error": "failed"},
            },
            "final_states": ["done", "failed"],
        },
    }
)


def test_start_dispatches_initial_state_with_input_only() -> None:
    decision = planner_for(SPEC).start({"x": 1})
    assert decision.state == {"current": "first", "seq": 1}
    [step] = decision.dispatch
    assert (step.seq, step.state, step.agent) == (1, "first", "a")
    assert step.payload == {"input": {"x": 1}, "last": None}
    assert decision.outcome is None


def test_success_path_passes_last_output_and_ends_succeeded() -> None:
    planner = planner_for(SPEC)
    d1 = planner.start("in")
    d2 = planner.on_result(d1.state, StepResult(1, "succeeded", {"o": 1}), "in")
    [step] = d2.dispatch
    assert step.state == "second" and step.payload == {"input": "in", "last": {"o": 1}}
    d3 = planner.on_result(d2.state, StepResult(2, "succeeded", "final"), "in")
    assert d3.dispatch == [] and d3.outcome is not None
    assert (d3.outcome.status, d3.outcome.output) == ("succeeded", "final")


def test_error_routes_to_on_error_and_final_error_fails_run() -> None:
    planner = planner_for(SPEC)
    d1 = planner.start(None)
    d2 = planner.on_result(d1.state, StepResult(1, "failed", None, "boom"), None)
    assert d2.dispatch[0].state == "repair"
    d3 = planner.on_result(d2.state, StepResult(2, "succeeded", 1), None)
    d4 = planner.on_result(d3.state, StepResult(3, "timeout", None, "too slow"), None)
    assert d4.outcome is not None and d4.outcome.status == "failed" and d4.outcome.error == "too slow"


def test_failure_without_on_error_fails_run() -> None:
    planner = planner_for(SPEC)
    state = {"current": "repair", "seq": 2}
    decision = planner.on_result(state, StepResult(2, "failed", None, "nope"), None)
    assert decision.outcome is not None and decision.outcome.status == "failed"
    assert decision.outcome.error == "nope"


def test_stale_result_is_ignored() -> None:
    planner = planner_for(SPEC)
    state = {"current": "second", "seq": 2}
    decision = planner.on_result(state, StepResult(1, "succeeded", None), None)
    assert decision.ignored and decision.state == state and not decision.dispatch


def test_max_steps_guard_fails_runaway_loop() -> None:
    loop = parse_workflow(
        {
            "name": "loop",
            "agents": {"a": {"type": "echo"}},
            "planner": {
                "type": "fsm",
                "initial_state": "s",
                "max_steps": 3,
                "states": {"s": {"agent": "a", "on_success": "s", "on_error": "end"}},
                "final_states": ["end"],
            },
        }
    )
    planner = planner_for(loop)
    decision = planner.start(None)
    seqs = []
    while decision.outcome is None:
        seqs.append(decision.dispatch[0].seq)
        decision = planner.on_result(decision.state, StepResult(decision.dispatch[0].seq, "succeeded"), None)
    assert seqs == [1, 2, 3]
    assert decision.outcome.status == "failed" and "max_steps=3" in (decision.outcome.error or "")


def test_replay_is_deterministic() -> None:
    results = [
        StepResult(1, "failed", None, "x"),
        StepResult(2, "succeeded", 2),
        StepResult(3, "succeeded", 3),
    ]

    def play() -> list[Decision]:
        planner = planner_for(SPEC)
        decisions = [planner.start({"k": "v"})]
        for result in results:
            decisions.append(planner.on_result(decisions[-1].state, result, {"k": "v"}))
        return decisions

    first: list[Any] = play()
    assert first == play()
    assert first[-1].outcome is not None and first[-1].outcome.status == "succeeded"
