from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentflow_core.planners.base import Decision, StepResult
from agentflow_core.planners.common import Checks, empty_vars
from agentflow_core.planners.llm import (
    PLAN_SCHEMA,
    LlmPlanner,
    parse_plan_text,
    planner_agent_spec,
    schema_problems,
    validate_instance,
    validate_plan,
)
from agentflow_core.planners.models import LlmPlannerSpec

AGENTS: dict[str, Any] = {
    "search": {"type": "echo", "description": "finds sources"},
    "summarize": {"type": "echo"},
    "write": {"type": "constant", "output": "report"},
}

PLAN = {
    "steps": [
        {"name": "find", "agent": "search", "input": {"q": "input.topic"}},
        {"name": "digest", "agent": "summarize", "depends_on": ["find"], "description": "condense"},
        {"name": "report", "agent": "write", "depends_on": ["digest"]},
    ]
}


def make(**settings_: Any) -> LlmPlanner:
    spec = LlmPlannerSpec.model_validate({"type": "llm", "model": {"model": "gpt-4o-mini"}, **settings_})
    checks = Checks()
    planner = LlmPlanner(spec, AGENTS, checks)
    assert checks.errors == []
    return planner


def answer(d: Decision, planner: LlmPlanner, content: Any, now: int = 0, run_input: Any = None) -> Decision:
    text = content if isinstance(content, str) else json.dumps(content)
    seq = d.state["plan_seq"]
    return planner.on_result(
        d.state, StepResult(seq, "succeeded", {"content": text, "usage": {"total_tokens": 9}}), run_input, now
    )


def ok(planner: LlmPlanner, d: Decision, step: str, output: Any = None, run_input: Any = None) -> Decision:
    seq = d.state["steps"][step]["seq"]
    return planner.on_result(d.state, StepResult(seq, "succeeded", output), run_input, 0)


def test_begin_dispatches_the_planning_step() -> None:
    planner = make(max_steps=5, queue="llm", timeout_s=30)
    d = planner.start({"goal": "write a market report", "topic": "tea"}, 0)
    [req] = d.dispatch
    assert (req.seq, req.state, req.agent) == (1, "__plan__", "__planner__")
    assert req.inline_agent == planner_agent_spec(planner._pspec)
    assert req.inline_agent == {
        "type": "llm_plan",
        "queue": "llm",
        "timeout_s": 30,
        "config": {"model": req.payload["model"]},
    }
    assert set(req.payload) == {"messages", "model", "response_format"}
    assert req.payload["response_format"] == "json"
    assert req.payload["model"]["model"] == "gpt-4o-mini" and req.payload["model"]["temperature"] == 0.0
    system, user = req.payload["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert "Goal: write a market report" in text
    assert '"topic": "tea"' in text
    assert "- search (type: echo); description: finds sources" in text
    assert "- write (type: constant)" in text
    assert "at most 5 steps" in text
    assert '"maxItems": 5' in text and '"enum": ["search", "summarize", "write"]' in text
    assert "failed" not in text.split("stops the run")[-1]
    assert d.state["phase"] == "planning" and d.state["seq"] == 1 and d.outcome is None


def test_valid_plan_executes_as_a_dag() -> None:
    planner = make()
    d = planner.start({"topic": "tea"}, 0)
    d = answer(d, planner, PLAN, run_input={"topic": "tea"})
    assert d.state["phase"] == "executing" and d.state["plan"] == PLAN
    [req] = d.dispatch
    # Plan inputs are literal JSON, never expressions.
    assert (req.seq, req.state, req.agent, req.payload) == (
        2,
        "find",
        "search",
        {"input": {"q": "input.topic"}, "last": None},
    )
    d = ok(planner, d, "find", ["s1"], run_input={"topic": "tea"})
    [req] = d.dispatch
    assert (req.state, req.payload) == ("digest", {"input": {"topic": "tea"}, "last": ["s1"]})
    d = ok(planner, d, "digest", "short")
    d = ok(planner, d, "report", "report")
    assert d.outcome is not None and d.outcome.status == "succeeded"
    assert d.outcome.output == {"find": ["s1"], "digest": "short", "report": "report"}


def test_parallel_plan_steps_respect_max_concurrency() -> None:
    planner = make(max_concurrency=1)
    plan = {"steps": [{"name": "a", "agent": "search"}, {"name": "b", "agent": "search"}]}
    d = answer(planner.start(None, 0), planner, plan)
    assert [r.state for r in d.dispatch] == ["a"]
    d = ok(planner, d, "a", 1)
    assert [r.state for r in d.dispatch] == ["b"]


def test_invalid_plan_gets_one_repair_with_the_errors() -> None:
    planner = make()
    d = planner.start({"topic": "tea"}, 0)
    first_messages = d.dispatch[0].payload["messages"]
    bad = {"steps": [{"name": "find", "agent": "google"}, {"name": "w", "agent": "write", "depends_on": ["nope"]}]}
    d = answer(d, planner, bad, run_input={"topic": "tea"})
    [req] = d.dispatch
    assert (req.seq, req.state, req.agent) == (2, "__plan__", "__planner__")
    messages = req.payload["messages"]
    assert messages[:2] == first_messages
    assert messages[2] == {"role": "assistant", "content": json.dumps(bad)}
    assert messages[3]["role"] == "user"
    assert (
        "$.steps[0].agent: 'google' is not an available agent (available: search, summarize, write)"
        in messages[3]["content"]
    )
    assert "$.steps[1].depends_on[0]: unknown step 'nope'" in messages[3]["content"]
    assert d.state["attempt"] == 2 and d.state["plan_seq"] == 2 and len(d.state["errors"]) == 2
    d = answer(d, planner, PLAN)
    assert [r.state for r in d.dispatch] == ["find"] and d.dispatch[0].seq == 3


def test_twice_invalid_fails_and_asks_for_the_fallback() -> None:
    planner = make()
    d = answer(planner.start(None, 0), planner, "I think you should search first.")
    assert d.state["errors"][0].startswith("$: the answer is not JSON")
    d = answer(d, planner, {"steps": []})
    assert d.dispatch == [] and d.outcome is not None and d.outcome.status == "failed"
    assert d.outcome.error == "LLM plan rejected: $.steps: fewer than 1 items"
    assert d.state["fallback_wanted"] is True and d.state["phase"] == "rejected"
    # Nothing more belongs to this plan.
    assert planner.on_result(d.state, StepResult(2, "succeeded", {}), None, 0).ignored


def test_failed_planning_step_is_rejected_without_repair() -> None:
    planner = make()
    d = planner.start(None, 0)
    d = planner.on_result(d.state, StepResult(1, "failed", None, "HTTP 401 from the model API"), None, 0)
    assert d.dispatch == [] and d.outcome is not None
    assert d.outcome.error == "LLM plan rejected: the planning step failed: HTTP 401 from the model API"
    assert d.state["fallback_wanted"] is True


def test_planning_output_without_content() -> None:
    planner = make()
    d = planner.start(None, 0)
    d = planner.on_result(d.state, StepResult(1, "succeeded", {"text": "?"}), None, 0)
    assert d.state["errors"] == ['$: the planning step returned no text (expected {"content": "<answer>"})']
    assert d.dispatch[0].payload["messages"][2]["content"] == '{"text": "?"}'


def test_late_and_foreign_results_are_ignored() -> None:
    planner = make()
    d = planner.start(None, 0)
    assert planner.on_result(d.state, StepResult(7, "succeeded", {}), None, 0).ignored
    d2 = answer(d, planner, "nope")
    # The first planning step's duplicate result after the repair went out.
    assert planner.on_result(d2.state, StepResult(1, "succeeded", {"content": json.dumps(PLAN)}), None, 0).ignored
    assert planner.on_timer(d2.state, None, 0).ignored


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (
            {"steps": [{"name": "a", "agent": "write"}, {"name": "b", "agent": "delete_everything"}]},
            "$.steps[1].agent: 'delete_everything' is not an available agent (available: search, summarize, write)",
        ),
        (
            {"steps": [{"name": f"s{i}", "agent": "write"} for i in range(4)]},
            "$.steps: 4 steps, but at most 3 are allowed (max_steps)",
        ),
        (
            {
                "steps": [
                    {"name": "a", "agent": "write", "depends_on": ["c"]},
                    {"name": "b", "agent": "write", "depends_on": ["a"]},
                    {"name": "c", "agent": "write", "depends_on": ["b"]},
                ]
            },
            "$.steps: dependency cycle: a -> c -> b -> a",
        ),
        (
            {"steps": [{"name": "a", "agent": "write"}, {"name": "a", "agent": "search"}]},
            "$.steps[1].name: duplicate step name 'a' (also $.steps[0].name)",
        ),
        (
            {"steps": [{"name": "__plan__", "agent": "write"}]},
            "$.steps[0].name: names starting with '__' are reserved",
        ),
        ({"steps": [{"name": "a", "agent": "write", "depends_on": ["a"]}]}, "$.steps: dependency cycle: a -> a"),
        ({"steps": [{"name": "a b", "agent": "write"}]}, '$.steps[0].name: "a b" does not match the pattern'),
        ({"steps": [{"name": "a"}]}, "$.steps[0]: missing required property 'agent'"),
        (
            {"steps": [{"name": "a", "agent": "write", "after": ["x"]}]},
            "$.steps[0].after: unexpected property (allowed: name, agent, depends_on, input, description)",
        ),
        ({"steps": [{"name": "a", "agent": "write"}], "on_failure": "retry"}, '$.on_failure: "retry" is not one of'),
        ({"plan": []}, "$: missing required property 'steps'"),
        ([1, 2], "$: expected object, got array"),
        ({"steps": [{"name": "a", "agent": "write", "input": 2**60}]}, "$: value cannot be canonicalized"),
    ],
)
def test_constraints_reject_plans_with_precise_errors(plan: Any, expected: str) -> None:
    errors = validate_plan(plan, agents=["search", "summarize", "write"], max_steps=3)
    assert any(e.startswith(expected) for e in errors), errors


def test_rejected_plan_reports_every_problem_at_once() -> None:
    plan = {"steps": [{"name": "a", "agent": "nope", "extra": 1}, {"name": "b", "agent": "write", "depends_on": ["z"]}]}
    errors = validate_plan(plan, agents=["write"], max_steps=5)
    assert errors == [
        "$.steps[0].extra: unexpected property (allowed: name, agent, depends_on, input, description)",
        "$.steps[0].agent: 'nope' is not an available agent (available: write)",
        "$.steps[1].depends_on[0]: unknown step 'z'",
    ]


def test_fenced_json_is_accepted() -> None:
    planner = make()
    content = "Here is the plan:\n```json\n" + json.dumps(PLAN, indent=2) + "\n```\nGood luck."
    d = answer(planner.start(None, 0), planner, content)
    assert d.state["phase"] == "executing" and [r.state for r in d.dispatch] == ["find"]
    assert parse_plan_text('```\n{"a": 1}\n```') == ({"a": 1}, [])


def test_unparseable_answers() -> None:
    assert parse_plan_text("   ") == (None, ["$: the answer is empty; expected a JSON plan"])
    value, errors = parse_plan_text('{"steps": [}')
    assert value is None and errors[0].startswith("$: the answer is not JSON: Expecting value at line 1 column 12")
    value, errors = parse_plan_text('```json\n{"x": NaN}\n```')
    assert errors == ["$: the answer is not JSON (in the fenced block): NaN is not a JSON value"]


def test_allowed_agents_and_plan_schema() -> None:
    planner = make(
        **{
            "agents": ["write"],
            "schema": {"properties": {"steps": {"maxItems": 1}}, "required": ["on_failure"]},
        },
    )
    d = planner.start(None, 0)
    text = d.dispatch[0].payload["messages"][1]["content"]
    assert "- write (type: constant)" in text and "- search" not in text
    assert "The plan must also match this JSON schema" in text
    d = answer(d, planner, PLAN)
    assert "$: missing required property 'on_failure'" in d.state["errors"]
    assert "$.steps: more than 1 items" in d.state["errors"]
    assert any(
        e.startswith("$.steps[0].agent: 'search' is not an available agent (available: write)")
        for e in d.state["errors"]
    )
    d = answer(d, planner, {"steps": [{"name": "w", "agent": "write"}], "on_failure": "fail"})
    assert [r.agent for r in d.dispatch] == ["write"]


def test_compile_errors() -> None:
    spec = LlmPlannerSpec.model_validate(
        {
            "type": "llm",
            "model": {"model": "m"},
            "agents": ["write", "ghost"],
            "schema": {"type": "objekt", "properties": {"a": {"minLength": -1}}, "dependencies": {}},
            "output": "((",
        }
    )
    checks = Checks()
    LlmPlanner(spec, AGENTS, checks)
    got = [f"{e['loc']}: {e['msg']}" for e in checks.errors]
    assert got[0] == "planner.agents.1: unknown agent 'ghost'"
    assert got[1].startswith("planner.schema.type: must be one of null, boolean")
    assert got[2] == "planner.schema.properties.a.minLength: must be a non-negative integer"
    assert got[3].startswith("planner.schema.dependencies: unsupported keyword")
    assert got[4].startswith("planner.output: invalid expression '(('")


def test_on_failure_continue_tolerates_failed_steps() -> None:
    planner = make()
    plan = {
        "steps": [
            {"name": "a", "agent": "search"},
            {"name": "b", "agent": "search"},
            {"name": "c", "agent": "write", "depends_on": ["b"]},
        ],
        "on_failure": "continue",
    }
    d = answer(planner.start(None, 0), planner, plan)
    d = planner.on_result(d.state, StepResult(d.state["steps"]["a"]["seq"], "failed", None, "x"), None, 0)
    assert d.outcome is None
    d = ok(planner, d, "b", 1)
    d = ok(planner, d, "c", 2)
    assert d.outcome is not None and d.outcome.status == "succeeded" and d.outcome.output == {"b": 1, "c": 2}

    # Default: the first failure fails the run, and it is not a rejected plan.
    plan.pop("on_failure")
    d = answer(planner.start(None, 0), planner, plan)
    d = planner.on_result(d.state, StepResult(d.state["steps"]["a"]["seq"], "failed", None, "x"), None, 0)
    assert d.outcome is not None and d.outcome.error == "step 'a' failed: x"
    assert d.cancel == [d.state["seq"]] and d.state["fallback_wanted"] is False


def test_conservative_policy_reruns_plan_steps() -> None:
    planner = make(on_failure={"policy": "conservative", "backoff_ms": 50})
    d = answer(planner.start(None, 0), planner, {"steps": [{"name": "a", "agent": "search"}]}, now=100)
    d = planner.on_result(d.state, StepResult(2, "failed", None, "x"), None, 100)
    assert d.wake_at_ms == 150 and d.outcome is None
    d = planner.on_timer(d.state, None, 150)
    assert [(r.seq, r.state) for r in d.dispatch] == [(3, "a")]


def test_run_output_expression() -> None:
    planner = make(output={"final": "last"})
    d = answer(planner.start(None, 0), planner, {"steps": [{"name": "a", "agent": "search"}]})
    d = ok(planner, d, "a", {"x": 1})
    assert d.outcome is not None and d.outcome.output == {"final": {"x": 1}}


def test_replan_prompt_includes_the_failure_and_earlier_outputs() -> None:
    planner = make()
    variables = {**empty_vars(), "outputs": {"fetch": {"rows": 3}}}
    d = planner.begin({"goal": "g"}, 0, 4, variables, "step 'load' failed: disk full")
    [req] = d.dispatch
    assert req.seq == 5 and d.state["failure"] == "step 'load' failed: disk full"
    text = req.payload["messages"][1]["content"]
    assert "An earlier plan for this run failed: step 'load' failed: disk full" in text
    assert '{"fetch": {"rows": 3}}' in text
    # The repair prompt keeps the same first messages.
    d2 = answer(d, planner, "??", run_input={"goal": "g"})
    assert d2.dispatch[0].payload["messages"][:2] == req.payload["messages"]
    # A plan continues the run's seqs and variables.
    d3 = answer(d2, planner, {"steps": [{"name": "a", "agent": "search"}]})
    assert d3.dispatch[0].seq == 7 and d3.state["vars"]["outputs"] == {"fetch": {"rows": 3}}


def test_template_placeholders() -> None:
    planner = make(template="Do {goal} with {{ .agents }} in {max_steps} steps; {failure} {schema_x} {unknown}")
    d = planner.begin({"goal": "it"}, 0, 0, empty_vars(), "boom")
    text = d.dispatch[0].payload["messages"][1]["content"]
    assert text.startswith("Do it with - search (type: echo); description: finds sources\n- summarize")
    assert "in 20 steps; boom {schema_x} {unknown}" in text
    assert "An earlier plan" not in text  # the template placed the failure itself


def test_prompt_does_not_depend_on_input_key_order() -> None:
    planner = make()
    a = planner.start({"b": 1, "a": {"y": 2, "x": 1}}, 0)
    b = planner.start({"a": {"x": 1, "y": 2}, "b": 1}, 0)
    assert a.dispatch == b.dispatch


def test_plan_dags_are_cached_and_bounded() -> None:
    planner = make()
    for i in range(70):
        answer(planner.start(None, 0), planner, {"steps": [{"name": f"s{i}", "agent": "search"}]})
    assert len(planner._dags) == 64
    d1 = answer(planner.start(None, 0), planner, PLAN)
    d2 = answer(planner.start(None, 0), planner, PLAN)
    assert d1 == d2


def test_state_is_not_mutated_and_survives_json() -> None:
    planner = make()
    d = planner.start({"topic": "t"}, 0)
    for text in ("bad", json.dumps(PLAN)):
        frozen = copy.deepcopy(d.state)
        nxt = answer(d, planner, text)
        assert d.state == frozen
        again = answer(Decision(state=json.loads(json.dumps(d.state))), planner, text)
        assert again == nxt
        d = nxt


@settings(max_examples=60, deadline=None)
@given(
    answers=st.lists(
        st.one_of(
            st.just(json.dumps(PLAN)),
            st.just("not json"),
            st.just('{"steps": [{"name": "x", "agent": "search", "depends_on": ["x"]}]}'),
            st.just('{"steps": [{"name": "p", "agent": "search"}, {"name": "q", "agent": "write"}]}'),
        ),
        min_size=2,
        max_size=2,
    ),
    outcomes=st.lists(st.booleans(), max_size=6),
)
def test_same_answers_and_events_give_same_decisions(answers: list[str], outcomes: list[bool]) -> None:
    def run(round_trip: bool) -> list[Any]:
        planner = make()
        d = planner.start({"topic": "t"}, 0)
        trace: list[Any] = [d]
        for text in answers:
            if d.state["phase"] != "planning":
                break
            state = json.loads(json.dumps(d.state)) if round_trip else d.state
            d = answer(Decision(state=state), planner, text)
            trace.append(d)
        for success in outcomes:
            if d.outcome is not None or not d.state.get("running"):
                break
            state = json.loads(json.dumps(d.state)) if round_trip else d.state
            seq = min(int(s) for s in state["running"])
            result = StepResult(seq, "succeeded", "out") if success else StepResult(seq, "failed", None, "e")
            d = planner.on_result(state, result, {"topic": "t"}, 0)
            trace.append(d)
        return trace

    assert run(False) == run(False) == run(True)


# --- the schema validator ----------------------------------------------------------------


def test_plan_schema_is_well_formed_for_the_validator() -> None:
    assert schema_problems(PLAN_SCHEMA) == []


def test_validator_keywords() -> None:
    schema = {
        "$defs": {"pos": {"type": "integer", "minimum": 1}},
        "type": "object",
        "properties": {
            "n": {"$ref": "#/$defs/pos"},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "maxItems": 2},
            "kind": {"anyOf": [{"const": "a"}, {"const": "b"}]},
            "flag": {"type": "boolean"},
        },
        "patternProperties": {"^x_": {"type": "number"}},
        "additionalProperties": False,
    }
    assert schema_problems(schema) == []
    assert validate_instance(schema, {"n": 2, "tags": ["a"], "kind": "b", "flag": True, "x_1": 1.5}) == []
    assert validate_instance(schema, {"n": 1.0}) == []  # 1.0 is an integer in JSON Schema
    errors = validate_instance(schema, {"n": 0, "tags": ["a", "a", "b"], "kind": "c", "flag": 1, "x_1": "s", "y": 1})
    assert errors == [
        "$.n: 0 is less than the minimum 1",
        "$.tags: more than 2 items",
        "$.tags[1]: duplicate of $.tags[0]",
        '$.kind: matches none of the anyOf alternatives (first: $.kind: must be "a", got "c")',
        "$.flag: expected boolean, got integer",
        "$.x_1: expected number, got string",
        "$.y: unexpected property (allowed: n, tags, kind, flag)",
    ]
    assert validate_instance({"enum": [1]}, True) == ["$: true is not one of 1"]
    assert validate_instance({"not": {"type": "null"}}, None) == ["$: must not match the 'not' schema"]
    assert schema_problems({"$ref": "#/nowhere"}) == [
        "schema.$ref: cannot resolve '#/nowhere' (only local references like '#/$defs/x')"
    ]
