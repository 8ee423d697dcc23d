"""Planner decision costs: pure functions, no I/O, so plain timing loops suffice.

Prints the median (and p95) of:

* ``fsm_transition_cel_us``: one FSM ``on_result`` on a state whose
  ``conditional_transitions`` evaluate a CEL condition on the output, up to the next
  dispatch (target: <= 10 µs);
* ``bt_tick_100_nodes_us``: one tick of a 100-node behavior tree (a result arriving for
  one of 50 actions under reactive/parallel/sequence controls with conditions) (target:
  <= 200 µs).

Usage: ``.venv/bin/python -m bench.planner_bench [--n 20000] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from agentflow_core.planners import StepResult, planner_for
from agentflow_core.spec import parse_workflow


def _stats(samples: list[float]) -> dict[str, float]:
    samples.sort()
    return {
        "median_us": round(statistics.median(samples), 2),
        "p95_us": round(samples[int(len(samples) * 0.95)], 2),
        "min_us": round(samples[0], 2),
    }


def _time(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
    return out


def fsm_transition(n: int) -> dict[str, float]:
    spec = parse_workflow(
        {
            "name": "bench-fsm",
            "agents": {"classifier": {"type": "echo"}, "responder": {"type": "echo"}, "review": {"type": "echo"}},
            "planner": {
                "type": "fsm",
                "initial_state": "classify",
                "states": {
                    "classify": {
                        "agent": "classifier",
                        "conditional_transitions": [
                            {"condition": "classifier.confidence < 0.5", "target": "review"},
                            {"condition": "classifier.confidence > 0.8", "target": "respond"},
                        ],
                        "on_success": "review",
                    },
                    "respond": {"agent": "responder", "on_success": "done"},
                    "review": {"agent": "review", "on_success": "done"},
                },
                "final_states": ["done"],
            },
        }
    )
    planner = planner_for(spec)
    run_input = {"message": "where is my order?", "customer": {"id": 42, "tier": "gold"}}
    started = planner.start(run_input, 0)
    result = StepResult(1, "succeeded", {"label": "shipping", "confidence": 0.93})

    def step() -> None:
        decision = planner.on_result(started.state, result, run_input, 0)
        assert decision.dispatch[0].state == "respond"

    step()
    return _stats(_time(step, n))


def bt_spec_100() -> dict[str, Any]:
    """100 nodes: a root parallel over 9 branches of 11 nodes (sequence, conditions,
    parallel actions, retry, inverter)."""
    branches = []
    for b in range(9):
        branches.append(
            {
                "type": "sequence",
                "name": f"branch{b}",
                "children": [
                    {"type": "condition", "check": "input.enabled == true"},
                    {
                        "type": "parallel",
                        "success_threshold": -1,
                        "children": [{"type": "action", "name": f"a{b}_{i}", "agent": "worker"} for i in range(3)],
                    },
                    {
                        "type": "retry",
                        "max_attempts": 2,
                        "child": {"type": "action", "name": f"r{b}", "agent": "worker"},
                    },
                    {"type": "inverter", "child": {"type": "condition", "check": "input.abort == true"}},
                    {"type": "action", "name": f"z{b}", "agent": "worker"},
                ],
            }
        )
    return {
        "name": "bench-bt",
        "agents": {"worker": {"type": "echo"}},
        "planner": {
            "type": "behavior_tree",
            "root": {"type": "parallel", "success_threshold": -1, "children": branches},
        },
    }


def count_nodes(node: dict[str, Any]) -> int:
    kids = list(node.get("children") or [])
    if node.get("child"):
        kids.append(node["child"])
    return 1 + sum(count_nodes(k) for k in kids)


def bt_tick(n: int) -> dict[str, float]:
    doc = bt_spec_100()
    nodes = count_nodes(doc["planner"]["root"])
    planner = planner_for(parse_workflow(doc))
    run_input = {"enabled": True, "abort": False}
    started = planner.start(run_input, 0)
    # A tree mid-run: every branch's three parallel actions in flight; one of them finishes.
    first = started.dispatch[0]
    result = StepResult(first.seq, "succeeded", {"ok": True})

    def tick() -> None:
        decision = planner.on_result(started.state, result, run_input, 0)
        assert decision.outcome is None

    tick()
    out = _stats(_time(tick, n))
    out["nodes"] = nodes
    out["in_flight"] = len(started.dispatch)
    return out


def bt_reactive_tick(n: int) -> dict[str, float]:
    """Worst case: a reactive_sequence re-checks 96 conditions on every tick (here: the
    result of one of two parallel actions arrives)."""
    children: list[dict[str, Any]] = [{"type": "condition", "check": f"input.limit > {i}"} for i in range(96)]
    children.append(
        {
            "type": "parallel",
            "children": [{"type": "action", "name": f"act{i}", "agent": "worker"} for i in range(2)],
        }
    )
    doc = {
        "name": "bench-bt-reactive",
        "agents": {"worker": {"type": "echo"}},
        "planner": {"type": "behavior_tree", "root": {"type": "reactive_sequence", "children": children}},
    }
    planner = planner_for(parse_workflow(doc))
    run_input = {"limit": 1000}
    started = planner.start(run_input, 0)
    result = StepResult(started.dispatch[0].seq, "succeeded", {"ok": True})

    def tick() -> None:
        decision = planner.on_result(started.state, result, run_input, 0)
        assert decision.outcome is None and not decision.ignored

    tick()
    out = _stats(_time(tick, n))
    out["nodes"] = count_nodes(doc["planner"]["root"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="samples per measure")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args(argv)
    summary = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": platform.processor()},
        "fsm_transition_cel_us": fsm_transition(args.n),
        "bt_tick_100_nodes_us": bt_tick(max(args.n // 4, 1000)),
        "bt_tick_reactive_96_conditions_us": bt_reactive_tick(max(args.n // 20, 200)),
        "targets": {"fsm_transition_cel_us.median_us": 10, "bt_tick_100_nodes_us.median_us": 200},
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
