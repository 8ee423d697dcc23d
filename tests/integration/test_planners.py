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


@pytest.fixture
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


__all__ = ["fake_llm", "json"]
