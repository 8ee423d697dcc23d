"""planner.transition events: what changed in a plan between two planner states."""

from __future__ import annotations

from agentflow_core.planners.progress import transition


def test_fsm_reports_from_and_to_and_nothing_when_it_stays() -> None:
    assert transition(None, {"current": "a", "visits": {}}) == {"planner": "fsm", "from": None, "to": "a"}
    assert transition({"current": "a", "visits": {}}, {"current": "b", "visits": {}}) == {
        "planner": "fsm", "from": "a", "to": "b"}  # fmt: skip
    assert transition({"current": "a", "vars": {"x": 1}}, {"current": "a", "vars": {"x": 2}}) is None


def test_bt_reports_running_nodes_and_status() -> None:
    before = {"status": "running", "active": {"0": 1}, "inflight": {"1": "0"}}
    after = {"status": "running", "active": {"0": 1, "10": 2, "4": 7}, "inflight": {}}
    assert transition(before, after) == {"planner": "bt", "status": "running", "running": ["0", "4", "10"]}
    assert transition(after, dict(after)) is None
    assert transition(after, {**after, "status": "succeeded", "active": {}}) == {
        "planner": "bt", "status": "succeeded", "running": []}  # fmt: skip


def test_dag_reports_only_changed_steps_with_progress() -> None:
    before = {"steps": {"a": {"status": "running"}, "b": {"status": "pending"}}, "running": {"1": "a"}}
    after = {"steps": {"a": {"status": "succeeded"}, "b": {"status": "running"}}, "running": {"2": "b"}}
    assert transition(before, after) == {
        "planner": "dag", "steps": {"a": "succeeded", "b": "running"}, "done": 1, "total": 2}  # fmt: skip
    assert transition(after, after) is None


def test_llm_planner_phase_and_its_plan() -> None:
    planning = {"phase": "planning", "seq": 1}
    executing = {"phase": "executing", "steps": {"s": {"status": "running"}}, "running": {"2": "s"}}
    assert transition(None, planning) == {"planner": "llm", "phase": "planning"}
    assert transition(planning, executing) == {
        "planner": "llm", "phase": "executing", "steps": {"s": "running"}, "done": 0, "total": 1}  # fmt: skip
    assert transition(executing, executing) is None
