"""What changed in a plan between two planner states, for the event stream and the UI.

Pure: the engine calls :func:`transition` with the state before and after a decision and
emits a ``planner.transition`` event when it returns something. Planners are recognised
by the shape of their state (each keeps its own keys), so no planner needs to know about
events: FSM states hold ``current``, behavior trees ``active``/``inflight``, DAGs
``steps``/``running``, and the LLM planner a ``phase`` (plus a DAG's keys once its plan
executes).
"""

from __future__ import annotations

from typing import Any

#: DAG step statuses reported; "pending" steps are not listed until they change
_DAG_SHOWN = frozenset({"running", "waiting", "succeeded", "failed", "skipped"})


def _dag_statuses(state: dict[str, Any]) -> dict[str, str]:
    steps = state.get("steps")
    if not isinstance(steps, dict):
        return {}
    out: dict[str, str] = {}
    for name, rec in steps.items():
        status = rec.get("status") if isinstance(rec, dict) else None
        if isinstance(status, str) and status in _DAG_SHOWN:
            out[str(name)] = status
    return out


def _dag_done(statuses: dict[str, str]) -> int:
    return sum(1 for s in statuses.values() if s in ("succeeded", "failed", "skipped"))


def _bt_running(state: dict[str, Any]) -> list[str]:
    active = state.get("active")
    if not isinstance(active, dict):
        return []
    return sorted((str(k) for k in active), key=lambda k: (len(k), k))


def transition(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any] | None:
    """The ``planner.transition`` event data for a decision, or None when the plan's
    visible position did not change (e.g. only variables or counters moved)."""
    before = before or {}
    if "current" in after or "visits" in after:
        if before.get("current") == after.get("current"):
            return None
        return {"planner": "fsm", "from": before.get("current"), "to": after.get("current")}
    if "inflight" in after and "active" in after:
        running, was = _bt_running(after), _bt_running(before)
        status = after.get("status")
        if running == was and status == before.get("status"):
            return None
        return {"planner": "bt", "status": status, "running": running}
    data: dict[str, Any] = {}
    if "phase" in after and after.get("phase") != before.get("phase"):
        data = {"planner": "llm", "phase": after.get("phase")}
    if "steps" in after and "running" in after:
        now, then = _dag_statuses(after), _dag_statuses(before)
        changed = {name: status for name, status in now.items() if then.get(name) != status}
        if changed:
            kind = "llm" if "phase" in after else "dag"
            data = {"planner": kind, **({"phase": after["phase"]} if kind == "llm" else {}), "steps": changed,
                    "done": _dag_done(now), "total": len(after["steps"])}  # fmt: skip
    return data or None
