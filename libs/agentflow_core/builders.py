"""Building workflow specs in code (tests, benchmarks, generated pipelines)."""

from __future__ import annotations

from typing import Any


def linear_fsm(name: str, steps: int, agent: dict[str, Any] | None = None) -> dict[str, Any]:
    """An FSM of ``steps`` states in a row, all running one agent (default ``echo``),
    ending in ``done`` (or ``failed`` on any step's error)."""
    states = {
        f"s{i}": {"agent": "a", "on_success": f"s{i + 1}" if i + 1 < steps else "done", "on_error": "failed"}
        for i in range(steps)
    }
    return {
        "name": name,
        "agents": {"a": agent or {"type": "echo"}},
        "planner": {"type": "fsm", "initial_state": "s0", "states": states, "final_states": ["done", "failed"]},
    }
