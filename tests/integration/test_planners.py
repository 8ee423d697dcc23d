"""Every planner type end to end: real control plane, Postgres, NATS JetStream and workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentflow_core.planners import StepResult, planner_for
from agentflow_core.spec import parse_workflow
from tests.support.fake_llm import FakeOpenAI
from tests.support.processes import Api

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def put(api: Api, spec: str | dict[str, Any]) -> str:
    response = api.put_workflow(spec)
    assert response.status_code == 200, response.text
    name: str = response.json()["name"]
    return name


def by_state(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["state"]: s for s in run["steps"]}


def replay_path(spec_doc: str | dict[str, Any], run: dict[str, Any]) -> list[str]:
    """Feed a finished sequential run's recorded results to a fresh planner; return its path."""
    planner = planner_for(parse_workflow(spec_doc))
    steps = sorted(run["steps"], key=lambda s: s["seq"])
    decision = planner.start(run["input"], 0)
    path = [r.state for r in decision.dispatch]
    for step in steps:
        status = "succeeded" if step["status"] == "succeeded" else "failed"
        decision = planner.on_result(decision.state, StepResult(step["seq"], status, step["output"]), run["input"], 0)
        path += [r.state for r in decision.dispatch]
    assert decision.outcome is not None
    return path


# --- FSM --------------------------------------------------------------------------------


def test_seed_fraud_detection_fsm_runs_and_replays(api: Api) -> None:
    doc = (EXAMPLES / "fraud-detection.yaml").read_text()
    name = put(api, doc)
    low = api.wait(api.start(name, {"transaction_id": "t1", "amount": 20}))
    assert low["status"] == "succeeded", low
    assert low["output"] == {"approved": True, "transaction": "t1"}
    assert [s["state"] for s in low["steps"]] == ["score_transaction"]

    high = api.wait(api.start(name, {"transaction_id": "t2", "amount": 5000}))
    assert high["status"] == "failed", high
    assert [s["state"] for s in sorted(high["steps"], key=lambda s: s["seq"])] == [
        "score_transaction",
        "additional_checks",
    ], json.dumps(high, indent=1)
    assert high["output"] == {"approved": False, "transaction": "t2"}
    # Replaying the recorded results reproduces the path exactly.
    for run in (low, high):
        assert replay_path(doc, run) == [s["state"] for s in sorted(run["steps"], key=lambda s: s["seq"])]


def test_seed_customer_support_fsm_with_conditional_transitions(api: Api) -> None:
    name = put(api, (EXAMPLES / "customer-support.yaml").read_text())
    confident = api.wait(api.start(name, {"message": "where is my order?", "confidence": 0.9}))
    assert confident["status"] == "succeeded", confident
    assert [s["state"] for s in sorted(confident["steps"], key=lambda s: s["seq"])] == [
        "classify",
        "knowledge_search",
        "generate_response",
    ]
    unsure = api.wait(api.start(name, {"message": "???", "confidence": 0.2}))
    assert [s["state"] for s in sorted(unsure["steps"], key=lambda s: s["seq"])] == [
        "classify",
        "knowledge_search",
        "human_review",
    ]


def test_fsm_missing_field_takes_error_path_and_max_steps_fails_run(api: Api) -> None:
    name = put(
        api,
        {
            "name": "loopy",
            "agents": {"a": {"type": "echo"}},
            "planner": {
                "type": "fsm",
                "initial_state": "s",
                "max_steps": 4,
                "states": {
                    "s": {
                        "agent": "a",
                        "conditional_transitions": [{"condition": "input.go", "target": "s"}],
                        "on_success": "done",
                        "on_error": "broken",
                    }
                },
                "final_states": ["done", "broken"],
            },
        },
    )
    looping = api.wait(api.start(name, {"go": True}))
    assert looping["status"] == "failed" and "max_steps=4" in looping["error"], looping
    assert len(looping["steps"]) == 4
    missing = api.wait(api.start(name, {"other": 1}))
    assert missing["status"] == "failed" and "no such field" in missing["error"], missing


def test_fsm_conservative_rerun_goes_through_engine_timers(api: Api) -> None:
    name = put(
        api,
        {
            "name": "stubborn",
            "agents": {"flaky": {"type": "fail", "times": 2}},
            "planner": {
                "type": "fsm",
                "initial_state": "s",
                "on_failure": {"policy": "conservative", "max_replans": 3, "backoff_ms": 100},
                "states": {"s": {"agent": "flaky", "on_success": "done"}},
                "final_states": ["done"],
            },
        },
    )
    run = api.wait(api.start(name, "x"))
    # The fail agent fails attempt 1 of each step; each re-run is a new step (attempt 1),
    # so every re-run fails too until the replans are used up.
    assert run["status"] == "failed", run
    assert [s["seq"] for s in run["steps"]] == [1, 2, 3, 4]
    gaps = [
        (b["queued_at"], a["finished_at"]) for a, b in zip(run["steps"], run["steps"][1:], strict=False)
    ]  # re-runs wait for the backoff
    assert all(queued > finished for queued, finished in gaps)


def test_bad_expression_is_a_422_naming_node_expression_and_position(api: Api) -> None:
    response = api.put_workflow(
        {
            "name": "bad-cel",
            "agents": {"a": {"type": "echo"}},
            "planner": {
                "type": "fsm",
                "initial_state": "s",
                "states": {
                    "s": {
                        "agent": "a",
                        "conditional_transitions": [{"condition": "a.score >", "target": "done"}],
                        "on_success": "done",
                    }
                },
                "final_states": ["done"],
            },
        }
    )
    assert response.status_code == 422
    [detail] = response.json()["errors"]
    assert detail["loc"] == "planner.states.s.conditional_transitions.0.condition"
    assert "'a.score >'" in detail["msg"] and "at 1:10" in detail["msg"]


# --- DAG --------------------------------------------------------------------------------


def test_dag_parallel_up_to_max_concurrency_with_skips_and_dependencies(api: Api) -> None:
    name = put(
        api,
        {
            "name": "pipeline",
            "agents": {
                "fetch": {"type": "sleep", "ms": 400},
                "merge": {"type": "echo"},
                "notify": {"type": "echo"},
                "report": {"type": "constant", "output": {"done": True}},
            },
            "planner": {
                "type": "dag",
                "max_concurrency": 2,
                "steps": [
                    {"name": "a", "agent": "fetch"},
                    {"name": "b", "agent": "fetch"},
                    {"name": "c", "agent": "fetch"},
                    {"name": "merge", "depends_on": ["a", "b", "c"], "input": {"total": "input.amount"}},
                    {
                        "name": "notify",
                        "depends_on": ["merge"],
                        "condition": {"operator": "greater_than", "left": "$merge.result.total", "right": 100},
                    },
                    {"name": "report", "depends_on": ["notify"]},
                ],
            },
        },
    )
    run = api.wait(api.start(name, {"amount": 5}))
    assert run["status"] == "succeeded", run
    steps = by_state(run)
    assert set(steps) == {"a", "b", "c", "merge", "report"}  # notify skipped: no step
    assert run["planner_state"]["steps"]["notify"]["status"] == "skipped"
    fetches = sorted((steps[n] for n in "abc"), key=lambda s: s["started_at"])
    # Two at once: the first two overlap, the third starts after one of them finished.
    assert fetches[1]["started_at"] < fetches[0]["finished_at"]
    assert fetches[2]["started_at"] >= min(fetches[0]["finished_at"], fetches[1]["finished_at"])
    assert steps["merge"]["queued_at"] >= max(s["finished_at"] for s in fetches)
    assert run["output"]["report"] == {"done": True}

    notified = api.wait(api.start(name, {"amount": 500}))
    assert "notify" in by_state(notified)


def test_dag_failure_halts_in_flight_steps(api: Api) -> None:
    name = put(
        api,
        {
            "name": "halting",
            "agents": {"slow": {"type": "sleep", "ms": 20000}, "bad": {"type": "fail", "times": 1}},
            "planner": {"type": "dag", "steps": {"long": {"agent": "slow"}, "broken": {"agent": "bad"}}},
        },
    )
    run = api.wait(api.start(name, None), timeout=15)
    assert run["status"] == "failed", run
    steps = by_state(run)
    assert steps["broken"]["status"] == "failed"
    assert steps["long"]["status"] == "cancelled"


# --- behavior tree ----------------------------------------------------------------------


def test_seed_content_moderation_tree_runs_parallel_checks(api: Api) -> None:
    name = put(api, (EXAMPLES / "content-moderation.yaml").read_text())
    clean = api.wait(api.start(name, {"toxicity": 0.1, "spam": 0.2, "pii": False}))
    assert clean["status"] == "succeeded", clean
    assert (
        set(by_state(clean)) >= {"toxicity_detector", "spam_detector", "pii_detector", "publish"}
        or len(clean["steps"]) == 4
    )
    assert any(s["agent"] == "publish" for s in clean["steps"])
    toxic = api.wait(api.start(name, {"toxicity": 0.9, "spam": 0.2, "pii": False}))
    assert toxic["status"] == "failed", toxic
    assert not any(s["agent"] == "publish" for s in toxic["steps"])


def test_bt_timeout_halts_the_running_step_on_the_worker(api: Api) -> None:
    name = put(
        api,
        {
            "name": "bt-timeout",
            "agents": {"slow": {"type": "sleep", "ms": 30000}, "rescue": {"type": "constant", "output": "rescued"}},
            "planner": {
                "type": "behavior_tree",
                "root": {
                    "type": "fallback",
                    "children": [
                        {"type": "timeout", "seconds": 0.5, "child": {"type": "action", "agent": "slow"}},
                        {"type": "action", "agent": "rescue"},
                    ],
                },
            },
        },
    )
    run = api.wait(api.start(name, None), timeout=15)
    assert run["status"] == "succeeded", run
    slow = next(s for s in run["steps"] if s["agent"] == "slow")
    assert slow["status"] == "cancelled"
    rescue = next(s for s in run["steps"] if s["agent"] == "rescue")
    assert rescue["status"] == "succeeded"
    # The timer fired about 0.5 s after the step was queued, not after 30 s.
    from datetime import datetime

    def ts(value: str) -> datetime:
        return datetime.fromisoformat(value)

    waited = (ts(rescue["queued_at"]) - ts(slow["queued_at"])).total_seconds()
    assert 0.4 <= waited < 5, waited


def test_bt_retry_decorator_starts_each_attempt_on_a_new_tick(api: Api) -> None:
    name = put(
        api,
        {
            "name": "bt-retry",
            "agents": {"flaky": {"type": "fail", "times": 1}},
            "planner": {
                "type": "behavior_tree",
                "root": {"type": "retry", "max_attempts": 3, "child": {"type": "action", "agent": "flaky"}},
            },
        },
    )
    run = api.wait(api.start(name, "x"))
    # The fail agent fails attempt 1 of every step: each retry is a new step, so all fail.
    assert run["status"] == "failed", run
    assert [s["seq"] for s in run["steps"]] == [1, 2, 3]


# --- guarded LLM planner -----------------------------------------------------------------


@pytest.fixture
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def llm_workflow(api_base: str, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "agents": {
            "search": {"type": "constant", "output": {"sources": ["a", "b"]}, "description": "finds sources"},
            "summarize": {"type": "echo", "description": "summarizes"},
            "write": {"type": "constant", "output": "the report"},
        },
        "planner": {
            "type": "llm",
            "model": {"model": "gpt-test", "api_base": api_base},
            "max_steps": 4,
            "fallback": {"type": "dag", "steps": [{"name": "search"}, {"name": "write", "depends_on": ["search"]}]},
        },
    }


PLAN = {
    "steps": [
        {"name": "find", "agent": "search"},
        {"name": "sum", "agent": "summarize", "depends_on": ["find"], "input": {"style": "short"}},
        {"name": "out", "agent": "write", "depends_on": ["sum"]},
    ]
}


def test_llm_plan_repaired_once_then_executed_as_dag(api: Api, fake_llm: FakeOpenAI) -> None:
    bad = {"steps": [{"name": "x", "agent": "hack_the_planet"}]}
    fake_llm.script({"content": json.dumps(bad)}, {"content": "```json\n" + json.dumps(PLAN) + "\n```"})
    name = put(api, llm_workflow(fake_llm.api_base, "llm-ok"))
    run = api.wait(api.start(name, {"topic": "otters"}), timeout=30)
    assert run["status"] == "succeeded", run
    assert [s["state"] for s in sorted(run["steps"], key=lambda s: s["seq"])] == [
        "__plan__",
        "__plan__",
        "find",
        "sum",
        "out",
    ]
    # A planner with a fallback is supervised: the LLM planner's own state is "inner".
    assert run["planner_state"]["inner"]["plan"]["steps"][0]["name"] == "find"
    assert len(fake_llm.requests) == 2
    repair = fake_llm.requests[1]["body"]["messages"]
    assert "hack_the_planet" in repair[-1]["content"]  # the validation errors go back to the model
    assert "otters" in fake_llm.requests[0]["body"]["messages"][-1]["content"]
    assert by_state(run)["sum"]["output"] == {"style": "short"}


def test_llm_plan_invalid_twice_runs_the_fallback(api: Api, fake_llm: FakeOpenAI) -> None:
    fake_llm.script({"content": "I think you should search the web."}, {"content": json.dumps({"steps": []})})
    name = put(api, llm_workflow(fake_llm.api_base, "llm-fallback"))
    run = api.wait(api.start(name, {"topic": "otters"}), timeout=30)
    assert run["status"] == "succeeded", run
    states = [s["state"] for s in sorted(run["steps"], key=lambda s: s["seq"])]
    assert states == ["__plan__", "__plan__", "search", "write"]
    assert run["planner_state"]["phase"] == "fallback"
    assert "LLM plan rejected" in run["planner_state"]["escalated_from"]


def test_llm_planning_call_errors_are_retried(api: Api, fake_llm: FakeOpenAI) -> None:
    fake_llm.script({"status": 503}, {"content": json.dumps(PLAN)})
    name = put(api, llm_workflow(fake_llm.api_base, "llm-retry"))
    run = api.wait(api.start(name, {"topic": "otters"}), timeout=30)
    assert run["status"] == "succeeded", run
    plan_step = next(s for s in run["steps"] if s["state"] == "__plan__")
    assert plan_step["attempt"] == 2
