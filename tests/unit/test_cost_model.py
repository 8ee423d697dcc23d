"""Preflight cost model: step estimates, plan shapes, worst cases, calibration."""

from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

import pytest

from agentflow_core.cost_model import (
    PLANNER_AGENT,
    UNBOUNDED_COMPLETION_ESTIMATE,
    UNKNOWN,
    Correction,
    CostEnv,
    ModelPrice,
    Observation,
    PlanEstimate,
    error_stats,
    estimate_plan,
    estimate_step,
    learn_corrections,
    observe,
    render_preflight,
    tool_cost_lookup,
)
from agentflow_core.planners.base import StepRequest, StepResult
from agentflow_core.planners.registry import compile_planner
from agentflow_core.spec import AgentSpec, WorkflowSpec, parse_workflow
from agentflow_core.tools_config import ToolsConfig
from agentflow_worker.agents.templating import render

MINI = "openai/gpt-4o-mini"
BIG = "openai/gpt-4o"
PRICES = {MINI: ModelPrice(1e-6, 4e-6), BIG: ModelPrice(5e-6, 20e-6)}


def words(route: str, messages: list[dict[str, Any]]) -> int:
    """A token counter whose numbers are easy to check: one token per word."""
    return sum(len(str(m["content"]).split()) for m in messages)


def make_env(**extra: Any) -> CostEnv:
    return CostEnv(price_of=PRICES.get, count_tokens=words, **extra)


def agent(**config: Any) -> AgentSpec:
    return AgentSpec.model_validate(config)


def llm(prompt: str, *, max_tokens: int = 100, model: str = "gpt-4o-mini", **extra: Any) -> AgentSpec:
    return agent(
        type="llm", model={"provider": "openai", "model": model, "max_tokens": max_tokens}, prompt=prompt, **extra
    )


def cost(route: str, prompt: int, completion: int) -> float:
    price = PRICES[route]
    return prompt * price.input_per_token + completion * price.output_per_token


# --- one step ------------------------------------------------------------------------------


def test_llm_step_renders_the_prompt_and_prices_it() -> None:
    seen: list[tuple[str, list[dict[str, Any]]]] = []

    def counter(route: str, messages: list[dict[str, Any]]) -> int:
        seen.append((route, messages))
        return words(route, messages)

    spec = llm("Summarize {input.text} now", system="You are terse.")
    env = CostEnv(price_of=PRICES.get, count_tokens=counter)
    est = estimate_step("summarizer", spec, {"input": {"text": "the quick brown fox"}, "last": None}, env)

    assert seen == [
        (
            MINI,
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Summarize the quick brown fox now"},
            ],
        )
    ]
    assert (est.agent, est.agent_type, est.model) == ("summarizer", "llm", MINI)
    assert (est.prompt_tokens, est.completion_tokens, est.llm_calls) == (9, 100, 1)
    assert (est.raw_prompt_tokens, est.raw_completion_tokens) == (9, 100)
    assert est.cost_usd == pytest.approx(9 * 1e-6 + 100 * 4e-6)
    # No tools, no schema: one call is also the worst case.
    assert est.max_cost_usd == pytest.approx(est.cost_usd)
    assert est.max_tokens_total == 109
    assert any("upper bound" in n for n in est.notes)


def test_retries_multiply_the_worst_case_only() -> None:
    spec = llm("Hi {input.name}", retry={"max_attempts": 3})
    est = estimate_step("greeter", spec, {"input": {"name": "Ann"}}, make_env())
    assert est.cost_usd == pytest.approx(cost(MINI, 2, 100))
    assert est.attempts == 3
    assert est.max_cost_usd == pytest.approx(3 * cost(MINI, 2, 100))
    assert est.max_tokens_total == 3 * 102


def test_observed_completion_is_preferred_over_max_tokens() -> None:
    env = make_env(observed_completion={("summarizer", MINI): 40.4})
    est = estimate_step("summarizer", llm("Summarize {input}"), {"input": "a b c"}, env)
    assert (est.prompt_tokens, est.completion_tokens) == (4, 40)
    assert est.cost_usd == pytest.approx(cost(MINI, 4, 40))
    assert not any("upper bound" in n for n in est.notes)
    # The worst case still completes max_tokens.
    assert est.max_tokens_total == 4 + 100
    # History of another agent (or model) does not apply.
    other = estimate_step("other", llm("Summarize {input}"), {"input": "a b c"}, env)
    assert other.completion_tokens == 100


def test_corrections_scale_the_expected_tokens_not_the_raw_ones() -> None:
    env = make_env(
        corrections={("summarizer", MINI): Correction(prompt=2.0, completion=0.25, samples=10)},
        observed_completion={("summarizer", MINI): 80},
    )
    est = estimate_step("summarizer", llm("Summarize {input}"), {"input": "a b c"}, env)
    assert (est.raw_prompt_tokens, est.raw_completion_tokens) == (4, 80)
    assert (est.prompt_tokens, est.completion_tokens) == (8, 20)
    assert est.cost_usd == pytest.approx(cost(MINI, 8, 20))
    # Worst case: the prompt factor above 1 applies, completion stays at max_tokens.
    assert est.max_tokens_total == 8 + 100


def test_a_correction_below_one_never_lowers_the_worst_case() -> None:
    env = make_env(corrections={("s", MINI): Correction(prompt=0.5, completion=0.5)})
    est = estimate_step("s", llm("one two three four"), {"input": None}, env)
    assert est.prompt_tokens == 2
    assert est.max_tokens_total == 4 + 100


def test_unknown_price_costs_nothing_and_says_so() -> None:
    spec = llm("Hello", model="mystery-7b")
    est = estimate_step("x", spec, {"input": None}, make_env())
    assert est.model == "openai/mystery-7b"
    assert est.prompt_tokens == 1 and est.completion_tokens == 100
    assert est.cost_usd == 0.0 and est.max_cost_usd == 0.0
    assert est.price_known is False
    assert any("no price known for openai/mystery-7b" in n for n in est.notes)


def test_placeholders_unknown_before_the_run_do_not_crash() -> None:
    spec = llm("Review {last.draft} for {input.audience}", system="{{json}} stays literal")
    est = estimate_step("reviewer", spec, {"input": {"audience": "kids"}, "last": UNKNOWN}, make_env())
    # "{last.draft}" is counted as written (one word), the rest is rendered.
    assert est.prompt_tokens == len(["{json}", "stays", "literal"]) + len(["Review", "{last.draft}", "for", "kids"])
    assert any("{last.draft}" in n and "run time" in n for n in est.notes)

    # An input unknown as a whole (an input mapping over earlier outputs): any field may exist.
    text, notes = render_preflight("Use {input.x} and {topic}", {"input": UNKNOWN, "last": None})
    assert text == "Use {input.x} and {topic}"
    assert "{input.x}" in notes[0] and "{topic}" in notes[0]


def test_missing_fields_and_bad_braces_are_noted_not_raised() -> None:
    text, notes = render_preflight("Hi {input.name} {nope}", {"input": {"name": "Ann"}, "last": None})
    assert text == "Hi Ann {nope}"
    assert notes == ("placeholders with no such field, the step would fail: {nope}",)
    text, notes = render_preflight('Reply {"a": 1}', {"input": {}})
    assert text == 'Reply {"a": 1}'
    assert "template error" in notes[0]


@pytest.mark.parametrize(
    "template",
    [
        "plain text",
        "{input.text} and {text}",
        "{input.items.1} {input.count} {input.flag} {input.none}",
        "{input} / {last}",
        "{{literal}} {input.nested.deep} }} {{",
        "unicode {input.text} é ✓",
    ],
)
def test_the_preflight_renderer_matches_the_workers(template: str) -> None:
    data = {
        "text": "héllo",
        "items": ["a", {"b": 2}],
        "count": 3,
        "flag": True,
        "none": None,
        "nested": {"deep": [1, 2.5]},
    }
    last = {"x": 1}
    scope = {**data, "input": data, "last": last}
    text, notes = render_preflight(template, {"input": data, "last": last})
    assert text == render(template, scope)
    assert notes == ()


def test_prompt_references_are_resolved_through_the_env() -> None:
    library = {"prompt:greet": "Hello there {input.name}"}
    env = make_env(resolve_prompt=lambda setting: library.get(setting, setting))
    est = estimate_step("g", llm("prompt:greet"), {"input": {"name": "Ann"}}, env)
    assert est.prompt_tokens == 3

    def broken(setting: str) -> str:
        raise FileNotFoundError("no registry")

    est = estimate_step("g", llm("prompt:greet"), {"input": {"name": "Ann"}}, make_env(resolve_prompt=broken))
    assert est.prompt_tokens == 1
    assert any("no registry" in n for n in est.notes)
    # With no resolver at all the reference is counted as written, and the note says so.
    est = estimate_step("g", llm("file:prompts/long.txt"), {"input": None}, make_env())
    assert any("not resolved at preflight" in n for n in est.notes)


def test_output_schema_adds_the_workers_instruction_and_a_repair_call() -> None:
    schema = {"type": "object"}
    est = estimate_step("j", llm("Give JSON", output_schema=schema), {"input": None}, make_env())
    instruction = "Answer with only a JSON value (no prose, no code fences) that satisfies this JSON Schema:\n"
    expected_prompt = len((instruction + json.dumps(schema)).split()) + 2
    assert est.prompt_tokens == expected_prompt
    # Two calls at most: the answer and one repair (whose prompt holds the first answer).
    assert est.max_tokens_total == (2 * expected_prompt + 100) + 2 * 100


def test_tool_loops_bound_the_worst_case_and_history_the_expected_tools() -> None:
    tools = {"cheap": 0.01, "pricey": 0.05}
    spec = llm("one two", tools=["cheap", "pricey"], max_iterations=2)
    env = make_env(tool_cost=tools.__getitem__)
    est = estimate_step("t", spec, {"input": None}, env)
    assert est.tool_cost_usd == 0.0 and est.cost_usd == pytest.approx(cost(MINI, 2, 100))
    # 3 calls (2 tool rounds + the answer); call k's prompt holds k earlier answers.
    prompt = 3 * 2 + 100 * (0 + 1 + 2)
    completion = 3 * 100
    assert est.max_tokens_total == prompt + completion
    assert est.max_cost_usd == pytest.approx(cost(MINI, prompt, completion) + 2 * 0.05)
    assert any("not bounded" in n for n in est.notes)

    with_history = make_env(tool_cost=tools.__getitem__, observed_tool_cost={("t", MINI): 0.03})
    est = estimate_step("t", spec, {"input": None}, with_history)
    assert est.tool_cost_usd == 0.03
    assert est.cost_usd == pytest.approx(cost(MINI, 2, 100) + 0.03)


def test_the_agents_own_ceilings_cap_its_worst_case() -> None:
    spec = llm("one two", tools=["t"], max_iterations=5, max_cost_usd=0.001, max_total_tokens=300)
    est = estimate_step("t", spec, {"input": None}, make_env(tool_cost=lambda _t: 0.0002))
    assert est.max_cost_usd == pytest.approx(0.001 + 0.0002)
    assert est.max_tokens_total == 300


def test_fallback_models_are_priced_once_at_the_highest_rates() -> None:
    spec = llm(
        "one two three",
        max_tokens=50,
        fallback_models=[{"provider": "openai", "model": "gpt-4o", "max_tokens": 80}],
    )
    est = estimate_step("f", spec, {"input": None}, make_env())
    assert est.cost_usd == pytest.approx(cost(MINI, 3, 50))  # the primary is expected
    assert est.max_tokens_total == 3 + 80
    assert est.max_cost_usd == pytest.approx(cost(BIG, 3, 80))


def test_max_tokens_unset_assumes_the_workers_default() -> None:
    spec = agent(type="llm", model={"provider": "openai", "model": "gpt-4o-mini", "max_tokens": None}, prompt="x")
    est = estimate_step("u", spec, {"input": None}, make_env())
    assert est.completion_tokens == UNBOUNDED_COMPLETION_ESTIMATE
    assert any("max_tokens not set" in n for n in est.notes)


def test_non_llm_agents_cost_nothing_except_tool_calls() -> None:
    env = make_env(tool_cost={"lookup": 0.002}.__getitem__)
    echo = estimate_step("e", agent(type="echo"), {"input": {"a": 1}}, env)
    assert (echo.cost_usd, echo.max_cost_usd, echo.total_tokens, echo.model, echo.notes) == (0.0, 0.0, 0, None, ())
    tool = estimate_step("t", agent(type="tool", tool="lookup", retry={"max_attempts": 2}), {"input": {}}, env)
    assert tool.cost_usd == 0.002 and tool.max_cost_usd == 0.004 and tool.total_tokens == 0
    custom = estimate_step("c", agent(type="my_plugin"), {"input": {}}, env)
    assert custom.cost_usd == 0.0 and "not modelled" in custom.notes[0]


def test_a_failing_token_counter_or_price_lookup_does_not_fail_the_estimate() -> None:
    def bad_counter(route: str, messages: list[dict[str, Any]]) -> int:
        raise RuntimeError("tokenizer missing")

    def bad_price(route: str) -> ModelPrice | None:
        raise KeyError(route)

    est = estimate_step("b", llm("hello"), {"input": None}, CostEnv(price_of=bad_price, count_tokens=bad_counter))
    assert est.prompt_tokens > 0 and est.cost_usd == 0.0
    assert any("tokenizer missing" in n for n in est.notes)


def test_tool_cost_lookup_covers_workflow_config_and_mcp_tools() -> None:
    config = ToolsConfig.model_validate(
        {
            "tools": [{"id": "weather", "handler": {"kind": "command", "argv": ["x"]}, "cost_per_call": 0.01}],
            "mcp": {
                "enabled": True,
                "servers": {"files": {"transport": "stdio", "command": ["x"], "cost_per_call": 0.3}},
            },
        }
    )
    spec = parse_workflow(
        """
name: t
tools:
  - {id: slugify, handler: {kind: command, argv: [x]}, cost_per_call: 0.002}
agents:
  a: {type: tool, tool: slugify}
planner: {type: dag, steps: {a: {}}}
"""
    )
    lookup = tool_cost_lookup(spec, config)
    assert [lookup(t) for t in ("weather", "slugify", "files.read", "code_executor", "nope", "other.x")] == [
        0.01,
        0.002,
        0.3,
        0.0,
        0.0,
        0.0,
    ]


# --- plans ---------------------------------------------------------------------------------

AGENTS_YAML = """
agents:
  draft:
    type: llm
    model: {provider: openai, model: gpt-4o-mini, max_tokens: 100}
    prompt: "Draft a post about {input.topic}"
  review:
    type: llm
    model: {provider: openai, model: gpt-4o, max_tokens: 20}
    prompt: "Review {last}"
  publish: {type: echo}
  alert: {type: echo}
"""
TOPIC = {"topic": "cats"}


def workflow(planner: str) -> WorkflowSpec:
    return parse_workflow(f"name: wf\n{AGENTS_YAML}\nplanner:\n{planner}")


def nodes(est: PlanEstimate) -> list[str | None]:
    return [s.node for s in est.steps]


def drive(spec: WorkflowSpec, run_input: Any, output: Any) -> list[str]:
    """The states the real planner dispatches when every step succeeds with ``output``."""
    planner = compile_planner(spec)
    decision = planner.start(run_input, 0)
    state, inflight, order = decision.state, list(decision.dispatch), []
    while inflight and decision.outcome is None:
        batch: list[StepRequest] = []
        for req in inflight:
            order.append(req.state)
            decision = planner.on_result(state, StepResult(req.seq, "succeeded", output), run_input, 0)
            state = decision.state
            batch.extend(decision.dispatch)
        inflight = batch
    return order


DRAFT = cost(MINI, 5, 100)  # "Draft a post about cats"
REVIEW = cost(BIG, 2, 20)  # "Review {last}", counted as written


def test_fsm_linear_path_is_the_dispatch_list() -> None:
    spec = workflow(
        """
  type: fsm
  initial_state: draft
  final_states: [done]
  states:
    draft: {on_success: review}
    review: {on_success: publish}
    publish: {on_success: done}
"""
    )
    est = estimate_plan(spec, TOPIC, make_env())
    assert nodes(est) == ["draft", "review", "publish"] == drive(spec, TOPIC, {"ok": True})
    assert [s.agent for s in est.steps] == ["draft", "review", "publish"]
    assert est.expected_steps == 3
    assert est.expected_cost_usd == pytest.approx(DRAFT + REVIEW)
    assert est.expected_tokens == 105 + 22
    assert est.worst_cost_usd == pytest.approx(est.expected_cost_usd)
    assert (est.worst_tokens, est.worst_steps) == (est.expected_tokens, 3)
    assert est.bounded is True
    # The first step sees last=None ("null"); later ones an output unknown before the run.
    assert any("{last}" in n for n in est.steps[1].notes)


FSM_LOOP = """
  type: fsm
  initial_state: draft
  max_steps: 10
  final_states: [done, failed]
  states:
    draft: {{on_success: review, on_error: alert}}
    review:
      conditional_transitions: [{{condition: "approved == true", target: done}}]
      on_success: draft
      {visits}
    alert: {{on_success: failed}}
"""


def test_fsm_loop_worst_case_is_bounded_by_max_visits() -> None:
    spec = workflow(FSM_LOOP.format(visits="max_visits: 3"))
    est = estimate_plan(spec, TOPIC, make_env())
    # Expected: the loop back to draft is not taken twice; review leaves for done.
    assert nodes(est) == ["draft", "review"] == drive(spec, TOPIC, {"approved": True})
    assert est.expected_cost_usd == pytest.approx(DRAFT + REVIEW)
    # review: 3 visits; draft: once at the start + once per review; alert (error path): once.
    assert est.bounded is True
    assert est.worst_steps == 3 + 4 + 1
    assert est.worst_cost_usd == pytest.approx(3 * REVIEW + 4 * DRAFT)
    assert est.worst_tokens == 3 * 22 + 4 * 105


def test_fsm_loop_without_max_visits_is_bounded_by_max_steps() -> None:
    spec = workflow(FSM_LOOP.format(visits=""))
    est = estimate_plan(spec, TOPIC, make_env())
    assert nodes(est) == ["draft", "review"]
    assert est.bounded is False
    assert est.worst_steps == 10
    # The 10 costliest dispatches the guard allows (review: pricier model), and separately
    # the 10 most token-hungry (draft: longer answers).
    assert REVIEW > DRAFT
    assert est.worst_cost_usd == pytest.approx(10 * REVIEW)
    assert est.worst_tokens == 10 * 105
    assert any("max_steps" in n for n in est.notes)


def test_fsm_conservative_replans_add_runs_per_state() -> None:
    spec = workflow(
        """
  type: fsm
  initial_state: draft
  final_states: [done]
  on_failure: {policy: conservative, max_replans: 2}
  states:
    draft: {on_success: done}
"""
    )
    est = estimate_plan(spec, TOPIC, make_env())
    assert est.expected_cost_usd == pytest.approx(DRAFT)
    assert est.worst_steps == 3 and est.worst_cost_usd == pytest.approx(3 * DRAFT)


def test_dag_runs_every_step_in_waves() -> None:
    spec = workflow(
        """
  type: dag
  steps:
    publish: {depends_on: [draft, review]}
    draft: {input: {topic: "input.topic + ' and dogs'"}}
    review: {}
    alert: {depends_on: [publish], condition: "steps.publish.status == 'failed'", trigger: all_done}
"""
    )
    est = estimate_plan(spec, TOPIC, make_env())
    # The real run skips alert (its condition is false); the estimate expects conditional steps.
    assert drive(spec, TOPIC, {"ok": True}) == ["draft", "review", "publish"]
    assert nodes(est) == ["draft", "review", "publish", "alert"]
    assert any("condition" in n and "alert" in n for n in est.notes)
    # draft's input mapping reads only the run input: evaluated before the run.
    assert est.steps[0].prompt_tokens == len(["Draft", "a", "post", "about", "cats", "and", "dogs"])
    # review has no dependency: its last is null.
    assert est.steps[1].prompt_tokens == len(["Review", "null"])
    assert est.expected_cost_usd == pytest.approx(cost(MINI, 7, 100) + cost(BIG, 2, 20))
    assert est.worst_cost_usd == pytest.approx(est.expected_cost_usd) and est.worst_steps == 4
    assert est.bounded is True


def test_dag_input_mappings_over_earlier_outputs_stay_unknown() -> None:
    spec = workflow(
        """
  type: dag
  on_failure: {policy: conservative, max_replans: 1}
  steps:
    review: {}
    draft: {depends_on: [review], input: {topic: "outputs.review.title", lang: "input.lang"}}
"""
    )
    est = estimate_plan(spec, {"topic": "cats", "lang": "en"}, make_env())
    assert nodes(est) == ["review", "draft"]
    draft = est.steps[1]
    assert draft.prompt_tokens == len(["Draft", "a", "post", "about", "{input.topic}"])
    assert any("{input.topic}" in n and "run time" in n for n in draft.notes)
    # conservative: every step may run 1 + max_replans times.
    assert est.worst_steps == 4 and est.worst_cost_usd == pytest.approx(2 * est.expected_cost_usd)


def test_bt_fallback_expects_the_first_child_and_bounds_all() -> None:
    spec = workflow(
        """
  type: behavior_tree
  root:
    type: fallback
    children:
      - {type: action, agent: draft, name: try_draft}
      - {type: action, agent: review}
"""
    )
    est = estimate_plan(spec, TOPIC, make_env())
    assert nodes(est) == ["try_draft"] == drive(spec, TOPIC, {"ok": True})
    assert est.expected_cost_usd == pytest.approx(DRAFT)
    assert est.worst_cost_usd == pytest.approx(DRAFT + REVIEW)
    assert est.worst_steps == 2 and est.bounded is True


def test_bt_retry_multiplies_the_worst_case_and_repeat_both() -> None:
    spec = workflow(
        """
  type: behavior_tree
  root:
    type: sequence
    children:
      - {type: retry, max_attempts: 3, child: {type: action, agent: draft}}
      - {type: repeat, times: 2, child: {type: action, agent: review}}
      - {type: condition, check: "input.topic == 'cats'"}
      - {type: action, agent: publish}
"""
    )
    est = estimate_plan(spec, TOPIC, make_env())
    assert nodes(est) == ["root/0/0", "root/1/0", "root/1/0", "root/3"] == drive(spec, TOPIC, {"ok": True})
    assert est.expected_cost_usd == pytest.approx(DRAFT + 2 * REVIEW)
    assert est.worst_cost_usd == pytest.approx(3 * DRAFT + 2 * REVIEW)
    assert est.worst_steps == 3 + 2 + 1


def test_bt_conditional_selector_expects_the_first_branch_and_sums_all() -> None:
    spec = workflow(
        """
  type: behavior_tree
  max_steps: 4
  root:
    type: repeat
    times: 5
    child:
      type: conditional_selector
      conditions:
        - {expression: "input.topic == 'cats'", child: {type: action, agent: review}}
        - {default: true, child: {type: action, agent: draft}}
"""
    )
    est = estimate_plan(spec, TOPIC, make_env())
    # Five passes expected, but max_steps=4 stops the run at the fifth dispatch.
    assert nodes(est) == ["root/0/0"] * 4
    assert any("max_steps=4" in n for n in est.notes)
    # Worst: 5 x (review + draft) dispatches, capped at the 4 costliest.
    assert est.worst_steps == 4 and est.worst_cost_usd == pytest.approx(4 * max(DRAFT, REVIEW))
    assert est.worst_tokens == 4 * 105


def test_llm_planner_counts_its_planning_call() -> None:
    spec = workflow(
        """
  type: llm
  max_steps: 3
  model: {provider: openai, model: gpt-4o, max_tokens: 500}
  agents: [draft, publish]
"""
    )
    seen: list[list[dict[str, Any]]] = []

    def counter(route: str, messages: list[dict[str, Any]]) -> int:
        seen.append(messages)
        return words(route, messages)

    est = estimate_plan(spec, {"goal": "write about cats", "topic": "cats"}, CostEnv(PRICES.get, counter))
    planning = est.steps[0]
    assert (planning.agent, planning.agent_type, planning.model, planning.node) == (
        PLANNER_AGENT,
        "llm_plan",
        BIG,
        "__plan__",
    )
    assert "Goal: write about cats" in seen[0][1]["content"]
    assert planning.prompt_tokens == words(BIG, seen[0]) and planning.completion_tokens == 500
    assert planning.attempts == 3  # the engine retries the planning step
    assert [s.agent for s in est.steps[1:]] == ["draft", "publish"]
    assert est.expected_cost_usd == pytest.approx(planning.cost_usd + DRAFT)
    # Worst: planning + its repair (the answer sent back) + max_steps runs of the costliest agent.
    p = planning.prompt_tokens
    worst_planning = 3 * (cost(BIG, p, 500) + cost(BIG, p + 500, 500))
    assert est.worst_steps == 2 + 3
    assert est.worst_cost_usd == pytest.approx(worst_planning + 3 * DRAFT)


def test_an_escalation_fallback_adds_to_the_worst_case_only() -> None:
    spec = workflow(
        """
  type: fsm
  initial_state: draft
  final_states: [done]
  on_failure: escalate
  states:
    draft: {on_success: done}
  fallback:
    type: dag
    steps: {review: {}}
"""
    )
    est = estimate_plan(spec, TOPIC, make_env())
    assert nodes(est) == ["draft"]
    assert est.worst_cost_usd == pytest.approx(DRAFT + REVIEW) and est.worst_steps == 2


def test_plan_estimate_as_dict_is_json_with_rounded_dollars() -> None:
    spec = workflow("  type: dag\n  steps: {draft: {}}\n")
    data = estimate_plan(spec, TOPIC, make_env()).as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["expected_cost_usd"] == round(DRAFT, 10)
    assert data["steps"][0]["node"] == "draft" and data["steps"][0]["cost_usd"] == round(DRAFT, 10)


def test_estimate_plan_is_fast_on_a_50_state_workflow() -> None:
    agents = "\n".join(
        f"  a{i}: {{type: llm, model: {{provider: openai, model: gpt-4o-mini}}, prompt: 'Step {i} on {{input.topic}}',"
        f" output_schema: {{type: object}}}}"
        for i in range(50)
    )
    states = "\n".join(
        f"    a{i}: {{on_success: {'done' if i == 49 else f'a{i + 1}'}, on_error: a0, max_visits: 2}}"
        for i in range(50)
    )
    spec = parse_workflow(
        f"name: big\nagents:\n{agents}\nplanner:\n  type: fsm\n  initial_state: a0\n"
        f"  final_states: [done]\n  states:\n{states}\n"
    )
    env = make_env()
    est = estimate_plan(spec, TOPIC, env)
    assert est.expected_steps == 50 and est.bounded
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        estimate_plan(spec, TOPIC, env)
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 0.02, timings


# --- calibration ---------------------------------------------------------------------------

CALIBRATION_WORKFLOW = """
name: calib
agents:
  research:
    {type: llm, model: {provider: openai, model: gpt-4o, max_tokens: 400}, prompt: "Research {input.topic} deeply"}
  outline: {type: llm, model: {provider: openai, model: gpt-4o-mini, max_tokens: 300}, prompt: "Outline {last}"}
  write: {type: llm, model: {provider: openai, model: gpt-4o-mini, max_tokens: 800}, prompt: "Write {last} well"}
  store: {type: echo}
planner:
  type: dag
  steps:
    research: {}
    outline: {depends_on: [research]}
    write: {depends_on: [outline]}
    store: {depends_on: [write]}
"""
#: how far each agent's real usage is from the uncalibrated estimate (prompt, completion)
TRUE_RATIOS = {"research": (1.4, 0.6), "outline": (30.0, 0.5), "write": (40.0, 0.7)}


def simulate(est: PlanEstimate, rng: random.Random) -> tuple[list[Observation], float]:
    """Actual usage of one run: the true ratios with +-10% uniform noise per step and component."""
    observations, total = [], 0.0
    for step in est.steps:
        if step.model is None:
            continue
        p_ratio, c_ratio = TRUE_RATIOS[step.agent]
        prompt = round(step.raw_prompt_tokens * p_ratio * rng.uniform(0.9, 1.1))
        completion = round(step.raw_completion_tokens * c_ratio * rng.uniform(0.9, 1.1))
        spent = cost(step.model, prompt, completion)
        total += spent
        observations.append(observe(step, actual_prompt=prompt, actual_completion=completion, actual_cost=spent))
    return observations, total


def test_calibration_brings_the_median_error_under_five_percent() -> None:
    spec = parse_workflow(CALIBRATION_WORKFLOW)
    rng = random.Random(7)
    # Prompts of realistic length: a 3-token prompt rounds its noise away.
    topic = {"topic": " ".join(["cats"] * 40)}
    env = make_env()
    history: list[Observation] = []
    before: list[tuple[float, float]] = []
    for _ in range(60):
        est = estimate_plan(spec, topic, env)
        observations, actual = simulate(est, rng)
        history.extend(observations)
        before.append((est.expected_cost_usd, actual))

    corrections = learn_corrections(history, window=50)
    assert set(corrections) == {("research", BIG), ("outline", MINI), ("write", MINI)}
    for (name, _route), factor in corrections.items():
        assert factor.samples == 50
        assert factor.prompt == pytest.approx(TRUE_RATIOS[name][0], rel=0.05)
        assert factor.completion == pytest.approx(TRUE_RATIOS[name][1], rel=0.05)

    calibrated = make_env(corrections=corrections)
    after_runs: list[tuple[float, float]] = []
    after_steps: list[tuple[float, float]] = []
    for _ in range(100):
        est = estimate_plan(spec, topic, calibrated)
        observations, actual = simulate(est, rng)
        after_runs.append((est.expected_cost_usd, actual))
        after_steps.extend((o.est_cost, o.actual_cost) for o in observations)

    uncalibrated = error_stats(before)
    runs = error_stats(after_runs)
    steps = error_stats(after_steps)
    assert uncalibrated["p50"] is not None and uncalibrated["p50"] > 0.3
    # The goal, for the workload (a run's total): p50 <= 5%.
    assert runs["count"] == 100 and runs["p50"] is not None and runs["p50"] <= 0.05
    # A single step cannot do much better than its own +-10% noise: compare with an oracle
    # that knows the true ratios.
    exact = {(o.agent, o.route): Correction(*TRUE_RATIOS[o.agent]) for o in history}
    oracle_steps: list[tuple[float, float]] = []
    for _ in range(100):
        observations, _ = simulate(estimate_plan(spec, topic, make_env(corrections=exact)), rng)
        oracle_steps.extend((o.est_cost, o.actual_cost) for o in observations)
    oracle = error_stats(oracle_steps)
    assert steps["p50"] is not None and oracle["p50"] is not None
    assert steps["p50"] <= oracle["p50"] + 0.015


def test_learn_corrections_follows_the_recent_window_and_ignores_outliers() -> None:
    def obs(ratio: float) -> Observation:
        return Observation("a", MINI, 100, 200, round(100 * ratio), round(200 * ratio))

    history = [obs(3.0)] * 20 + [obs(0.5)] * 9 + [obs(40.0)]  # drift, then one wild step
    [(key, factor)] = learn_corrections(history, window=10).items()
    assert key == ("a", MINI)
    assert (factor.prompt, factor.completion, factor.samples) == (0.5, 0.5, 10)
    # Zero estimates carry no ratio; absurd ratios are clamped.
    [factor] = learn_corrections([Observation("b", MINI, 0, 10, 50, 100_000)]).values()
    assert (factor.prompt, factor.completion) == (1.0, 100.0)
    with pytest.raises(ValueError):
        learn_corrections(history, window=0)


def test_error_stats_percentiles() -> None:
    pairs = [(110.0, 100.0), (90.0, 100.0), (100.0, 100.0), (150.0, 100.0), (5.0, 0.0)]
    stats = error_stats(pairs)
    assert stats["count"] == 4  # actual == 0 is skipped
    assert stats["p50"] == pytest.approx(0.1)  # errors 0, .1, .1, .5
    assert stats["p95"] == pytest.approx(0.1 + 0.4 * 0.85)
    assert stats["mean"] == pytest.approx(0.175)
    assert error_stats([]) == {"count": 0, "p50": None, "p95": None, "mean": None}
    assert error_stats([(3.0, 2.0)])["p95"] == pytest.approx(0.5)


def test_observe_records_the_uncorrected_estimate() -> None:
    env = make_env(corrections={("s", MINI): Correction(prompt=3.0, completion=0.5)})
    est = estimate_step("s", llm("a b"), {"input": None}, env)
    found = observe(est, actual_prompt=7, actual_completion=60, actual_cost=0.001)
    assert found == Observation("s", MINI, 2, 100, 7, 60, est.cost_usd, 0.001)
    with pytest.raises(ValueError):
        observe(estimate_step("e", agent(type="echo"), {}, env), actual_prompt=0, actual_completion=0, actual_cost=0)
