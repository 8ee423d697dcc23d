from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentflow_core.errors import ValidationFailed
from agentflow_core.planners import Decision, StepResult, planner_for
from agentflow_core.spec import WorkflowSpec, parse_workflow

NOW = 1_000_000

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


def fsm(states: dict[str, Any], finals: Any = ("done",), **planner: Any) -> WorkflowSpec:
    agents = {"a": {"type": "echo"}, "b": {"type": "echo"}, "c": {"type": "echo"}}
    agents.update(planner.pop("agents", {}))
    return parse_workflow(
        {
            "name": "t",
            "agents": agents,
            "planner": {
                "type": "fsm",
                "initial_state": planner.pop("initial_state", next(iter(states))),
                "states": states,
                "final_states": list(finals) if isinstance(finals, tuple) else finals,
                **planner,
            },
        }
    )


def drive(spec: WorkflowSpec, run_input: Any, outputs: dict[str, Any]) -> tuple[list[str], Decision]:
    """Run to completion, answering each state's step with ``outputs[state]``
    (an Exception instance answers with a failure)."""
    planner = planner_for(spec)
    decision = planner.start(run_input, NOW)
    path = []
    while decision.outcome is None:
        [step] = decision.dispatch
        path.append(step.state)
        out = outputs.get(step.state)
        if isinstance(out, Exception):
            result = StepResult(step.seq, "failed", None, str(out))
        else:
            result = StepResult(step.seq, "succeeded", out)
        decision = planner.on_result(decision.state, result, run_input, NOW)
    return path, decision


def test_start_dispatches_initial_state_with_input_only() -> None:
    decision = planner_for(SPEC).start({"x": 1}, NOW)
    assert decision.state["current"] == "first" and decision.state["seq"] == 1
    [step] = decision.dispatch
    assert (step.seq, step.state, step.agent) == (1, "first", "a")
    assert step.payload == {"input": {"x": 1}, "last": None}


def test_success_path_and_output_is_last_step_output() -> None:
    path, decision = drive(SPEC, "in", {"first": {"o": 1}, "second": "final"})
    assert path == ["first", "second"]
    assert decision.outcome is not None and decision.outcome.status == "succeeded"
    assert decision.outcome.output == "final"


def test_error_path_and_failed_final_carries_error() -> None:
    path, decision = drive(SPEC, None, {"first": RuntimeError("boom"), "repair": 1, "second": RuntimeError("bad")})
    assert path == ["first", "repair", "second"]
    assert decision.outcome is not None and decision.outcome.status == "failed"
    assert decision.outcome.error == "bad"


def test_stale_result_is_ignored() -> None:
    planner = planner_for(SPEC)
    d1 = planner.start(None, NOW)
    stale = planner.on_result(d1.state, StepResult(7, "succeeded", 1), None, NOW)
    assert stale.ignored and stale.state == d1.state and not stale.dispatch


def test_timeout_goes_to_on_timeout_before_on_error() -> None:
    spec = fsm(
        {
            "s": {"agent": "a", "on_success": "done", "on_error": "done", "on_timeout": "slow"},
            "slow": {"agent": "b", "on_success": "done"},
        }
    )
    planner = planner_for(spec)
    d1 = planner.start(None, NOW)
    d2 = planner.on_result(d1.state, StepResult(1, "timeout", None, "too slow"), None, NOW)
    assert d2.dispatch[0].state == "slow"
    d3 = planner.on_result(d1.state, StepResult(1, "failed", None, "x"), None, NOW)
    assert d3.outcome is not None and d3.outcome.status == "failed"


def test_conditional_transitions_first_match_wins_before_on_success() -> None:
    spec = fsm(
        {
            "classify": {
                "agent": "a",
                "conditional_transitions": [
                    {"condition": "a.confidence < 0.7", "target": "review"},
                    {"condition": "size(a.sources) == 0", "target": "escalate"},
                ],
                "on_success": "respond",
            },
            "review": {"agent": "b", "on_success": "done"},
            "escalate": {"agent": "b", "on_success": "done"},
            "respond": {"agent": "c", "on_success": "done"},
        }
    )
    assert drive(spec, None, {"classify": {"confidence": 0.5, "sources": []}})[0] == ["classify", "review"]
    assert drive(spec, None, {"classify": {"confidence": 0.9, "sources": []}})[0] == ["classify", "escalate"]
    assert drive(spec, None, {"classify": {"confidence": 0.9, "sources": [1]}})[0] == ["classify", "respond"]


def test_missing_field_routes_to_error_path_not_crash() -> None:
    spec = fsm(
        {
            "s": {
                "agent": "a",
                "conditional_transitions": [{"condition": "a.missing > 1", "target": "done"}],
                "on_success": "done",
                "on_error": "handle",
            },
            "handle": {"agent": "b", "on_success": "done"},
        }
    )
    path, decision = drive(spec, None, {"s": {"present": 1}})
    assert path == ["s", "handle"]
    spec_no_error = fsm(
        {
            "s": {
                "agent": "a",
                "conditional_transitions": [{"condition": "a.missing", "target": "done"}],
                "on_success": "done",
            }
        }
    )
    _, decision = drive(spec_no_error, None, {"s": {}})
    assert decision.outcome is not None and decision.outcome.status == "failed"
    assert "missing" in (decision.outcome.error or "")


def test_seed_fraud_detection_condition_states() -> None:
    spec = parse_workflow(
        """
name: fraud-detection
agents:
  score_transaction: {type: constant, output: {risk_score: 0.5}}
  additional: {type: constant, output: {combined_score: 0.9}}
planner:
  type: fsm
  definition: |
    states:
      score_transaction:
        on_success: check_velocity
        on_error: flag_for_manual_review
      check_velocity:
        condition: "risk_score < 0.7"
        on_true: approve_transaction
        on_false: additional_checks
      additional_checks:
        agent: additional
        on_success: final_decision
      final_decision:
        condition: "combined_score < 0.8"
        on_true: approve_transaction
        on_false: flag_for_manual_review
    initial_state: score_transaction
    final_states:
      approve_transaction: {output: "{'approved': true}"}
      flag_for_manual_review: {status: failed, output: "{'approved': false}"}
"""
    )
    path, decision = drive(spec, None, {"score_transaction": {"risk_score": 0.2}})
    assert path == ["score_transaction"]
    assert decision.outcome is not None and decision.outcome.output == {"approved": True}
    path, decision = drive(
        spec, None, {"score_transaction": {"risk_score": 0.9}, "additional_checks": {"combined_score": 0.95}}
    )
    assert path == ["score_transaction", "additional_checks"]
    assert decision.outcome is not None
    assert (decision.outcome.status, decision.outcome.output) == ("failed", {"approved": False})


def test_input_and_output_mappings_and_name_precedence() -> None:
    spec = fsm(
        {
            "fetch": {
                "agent": "a",
                "input": {"user": "input.user", "fixed": 3},
                "output": {"n": "last.count"},
                "on_success": "use",
            },
            "use": {
                "agent": "b",
                "input": {"n": "fetch.n", "via_path": "$.outputs.fetch.n", "field": "n"},
                "on_success": "done",
            },
        }
    )
    planner = planner_for(spec)
    d1 = planner.start({"user": "ann"}, NOW)
    assert d1.dispatch[0].payload["input"] == {"user": "ann", "fixed": 3}
    d2 = planner.on_result(d1.state, StepResult(1, "succeeded", {"count": 5}), {"user": "ann"}, NOW)
    assert d2.dispatch[0].payload["input"] == {"n": 5, "via_path": 5, "field": 5}
    assert d2.dispatch[0].payload["last"] == {"n": 5}


def test_state_keeps_only_the_last_output_when_nothing_reads_earlier_ones() -> None:
    plain = fsm({"s": {"agent": "a", "on_success": "t"}, "t": {"agent": "b", "on_success": "done"}})
    planner = planner_for(plain)
    d = planner.on_result(planner.start(None, NOW).state, StepResult(1, "succeeded", {"big": "x"}), None, NOW)
    assert d.state["vars"]["outputs"] == {} and d.state["vars"]["last"] == {"big": "x"}
    reading = fsm({"s": {"agent": "a", "on_success": "t"}, "t": {"agent": "b", "input": "s", "on_success": "done"}})
    planner = planner_for(reading)
    d = planner.on_result(planner.start(None, NOW).state, StepResult(1, "succeeded", {"big": "x"}), None, NOW)
    assert d.state["vars"]["outputs"] == {"s": {"big": "x"}}
    assert d.dispatch[0].payload["input"] == {"big": "x"}


def test_max_visits_guards_a_loop() -> None:
    spec = fsm(
        {
            "s": {
                "agent": "a",
                "conditional_transitions": [{"condition": "true", "target": "s"}],
                "on_success": "done",
                "max_visits": 3,
            }
        }
    )
    path, decision = drive(spec, None, {"s": 1})
    assert path == ["s", "s", "s"]
    assert decision.outcome is not None and "max_visits=3" in (decision.outcome.error or "")


def test_max_steps_default_is_1000_and_fails_with_reason() -> None:
    spec = fsm({"s": {"agent": "a", "on_success": "s", "on_error": "done"}})
    assert spec.planner.max_steps == 1000
    spec = fsm({"s": {"agent": "a", "on_success": "s", "on_error": "done"}}, max_steps=3)
    path, decision = drive(spec, None, {})
    assert len(path) == 3
    assert decision.outcome is not None and "max_steps=3" in (decision.outcome.error or "")


def test_decision_only_loop_is_bounded() -> None:
    spec = fsm(
        {
            "s": {"agent": "a", "on_success": "x"},
            "x": {"condition": "true", "on_true": "y", "on_false": "done"},
            "y": {"condition": "true", "on_true": "x", "on_false": "done"},
        },
        max_steps=50,
    )
    _, decision = drive(spec, None, {})
    assert decision.outcome is not None and decision.outcome.status == "failed"


def test_success_policies() -> None:
    states = {
        "s": {"agent": "a", "on_success": "t", "on_error": "t"},
        "t": {"agent": "b", "on_success": "done", "on_error": "done"},
    }
    outputs = {"s": RuntimeError("s broke"), "t": 1}
    _, d = drive(fsm(states, success_policy="final_node"), None, outputs)
    assert d.outcome is not None and d.outcome.status == "succeeded"
    _, d = drive(fsm(states, success_policy="all_nodes"), None, outputs)
    assert d.outcome is not None and d.outcome.status == "failed" and "s" in (d.outcome.error or "")
    _, d = drive(fsm(states, success_policy={"critical_nodes": ["t"]}), None, outputs)
    assert d.outcome is not None and d.outcome.status == "succeeded"
    _, d = drive(fsm(states, success_policy={"critical_nodes": ["s"]}), None, outputs)
    assert d.outcome is not None and d.outcome.status == "failed"


def test_conservative_policy_reruns_failed_state_after_backoff() -> None:
    spec = fsm(
        {"s": {"agent": "a", "on_success": "done"}},
        on_failure={"policy": "conservative", "max_replans": 2, "backoff_ms": 100},
    )
    planner = planner_for(spec)
    d = planner.start(None, NOW)
    d = planner.on_result(d.state, StepResult(1, "failed", None, "x"), None, NOW)
    assert not d.dispatch and d.wake_at_ms == NOW + 100 and d.outcome is None
    early = planner.on_timer(d.state, None, NOW + 50)
    assert not early.dispatch and early.wake_at_ms == NOW + 100
    d = planner.on_timer(d.state, None, NOW + 100)
    assert d.dispatch[0].seq == 2 and d.dispatch[0].state == "s"
    d = planner.on_result(d.state, StepResult(2, "failed", None, "x"), None, NOW + 150)
    assert d.wake_at_ms == NOW + 150 + 200  # backoff doubles
    d = planner.on_timer(d.state, None, NOW + 400)
    d = planner.on_result(d.state, StepResult(3, "failed", None, "final"), None, NOW + 500)
    assert d.outcome is not None and d.outcome.status == "failed" and d.outcome.error == "final"


def test_escalate_switches_to_fallback_plan_continuing_seqs_and_outputs() -> None:
    spec = fsm(
        {"s": {"agent": "a", "on_success": "done"}},
        on_failure="escalate",
        fallback={
            "type": "fsm",
            "initial_state": "f",
            "states": {"f": {"agent": "b", "input": "outputs", "on_success": "ok"}},
            "final_states": ["ok"],
        },
    )
    planner = planner_for(spec)
    d = planner.start(None, NOW)
    d = planner.on_result(d.state, StepResult(1, "failed", None, "primary broke"), None, NOW)
    assert d.outcome is None and d.state["phase"] == "fallback"
    [step] = d.dispatch
    assert (step.seq, step.agent) == (2, "b")
    assert step.payload["input"] == {}  # the fallback sees the outputs so far (s failed: none)
    d = planner.on_result(d.state, StepResult(2, "succeeded", "rescued"), None, NOW)
    assert d.outcome is not None and (d.outcome.status, d.outcome.output) == ("succeeded", "rescued")


@pytest.mark.parametrize(
    ("states", "extra", "loc", "needle"),
    [
        ({"s": {"agent": "a", "on_success": "nowhere"}}, {}, "planner.states.s.on_success", "unknown state"),
        (
            {
                "s": {
                    "agent": "a",
                    "conditional_transitions": [{"condition": "a.x >", "target": "done"}],
                    "on_success": "done",
                }
            },
            {},
            "planner.states.s.conditional_transitions.0.condition",
            "at 1:",
        ),
        (
            {"s": {"agent": "a", "on_success": "t"}, "t": {"agent": "b", "on_success": "t"}},
            {},
            "planner.states.t",
            "no path from this state to a final state",
        ),
        (
            {"s": {"agent": "a", "input": {"x": "b.y"}, "on_success": "t"}, "t": {"agent": "b", "on_success": "done"}},
            {},
            "planner.states.s.input",
            "cannot have run",
        ),
        ({"s": {"condition": "x > 1", "on_true": "done"}}, {}, "planner.states.s.condition", "on_true and on_false"),
        ({"s": {"on_success": "done"}}, {}, "planner.states.s.agent", "no agent is named 's'"),
        (
            {"s": {"agent": "a", "on_success": "done"}},
            {"on_failure": "human"},
            "planner.on_failure.policy",
            "human tasks",
        ),
        (
            {"s": {"agent": "a", "on_success": "done"}},
            {"on_failure": "escalate"},
            "planner.on_failure.policy",
            "fallback",
        ),
        (
            {"s": {"agent": "a", "router": "func:nope", "on_success": "done"}},
            {},
            "planner.states.s.router",
            "no routing function 'nope'",
        ),
    ],
)
def test_static_checks(states: dict[str, Any], extra: dict[str, Any], loc: str, needle: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        fsm(states, **extra)
    assert any(d["loc"] == loc and needle in d["msg"] for d in info.value.details), info.value.details


def test_definition_must_be_yaml_mapping() -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_workflow(
            {"name": "x", "agents": {"a": {"type": "echo"}}, "planner": {"type": "fsm", "definition": "- 1"}}
        )
    assert info.value.details[0]["loc"] == "planner.definition"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10)), min_size=1, max_size=30))
def test_same_events_same_decisions_and_state_survives_json(events: list[tuple[bool, int]]) -> None:
    spec = fsm(
        {
            "s": {
                "agent": "a",
                "conditional_transitions": [{"condition": "a.v > 5", "target": "t"}],
                "on_success": "s",
                "on_error": "t",
                "max_visits": 40,
            },
            "t": {"agent": "b", "on_success": "s", "on_error": "done"},
        },
        max_steps=25,
    )

    def play(roundtrip: bool) -> list[Decision]:
        planner = planner_for(spec)
        decisions = [planner.start({"k": "v"}, NOW)]
        for ok, v in events:
            last = decisions[-1]
            if last.outcome is not None:
                break
            state = json.loads(json.dumps(last.state)) if roundtrip else last.state
            result = StepResult(last.dispatch[0].seq, "succeeded" if ok else "failed", {"v": v}, None if ok else "e")
            decisions.append(planner.on_result(state, result, {"k": "v"}, NOW))
        return decisions

    first = play(False)
    assert first == play(False)
    assert [(d.dispatch, d.outcome) for d in first] == [(d.dispatch, d.outcome) for d in play(True)]


def test_adaptive_policy_asks_an_llm_planner_with_the_failure() -> None:
    spec = fsm(
        {"s": {"agent": "a", "on_success": "done"}},
        on_failure={"policy": "adaptive", "replanner": {"model": {"model": "planner-model"}}},
    )
    planner = planner_for(spec)
    d = planner.start({"goal": "x"}, NOW)
    d = planner.on_result(d.state, StepResult(1, "failed", None, "disk full on s"), {"goal": "x"}, NOW)
    assert d.outcome is None and d.state["phase"] == "fallback"
    [plan_step] = d.dispatch
    assert (plan_step.seq, plan_step.agent, plan_step.state) == (2, "__planner__", "__plan__")
    assert plan_step.inline_agent is not None and plan_step.inline_agent["type"] == "llm_plan"
    prompt = " ".join(m["content"] for m in plan_step.payload["messages"])
    assert "disk full on s" in prompt
