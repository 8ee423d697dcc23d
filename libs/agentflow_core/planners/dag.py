"""DAG pipeline planner: steps with ``depends_on``, optional conditions, parallel execution.

Semantics (see ``docs/planners/dag.md`` for the user's view):

* A step becomes *ready* once every dependency has finished, i.e. ``succeeded`` or
  ``skipped``. A skipped dependency satisfies its dependents (like Airflow's
  ``none_failed``); a dependent that needs the output checks
  ``steps.x.status == "succeeded"``. A dependency that *failed*, or was itself skipped
  because its upstream failed, skips the step with reason ``"upstream failed"`` (only
  reachable under the tolerant success policies).
* A ready step's ``condition`` is evaluated once: false skips it, an evaluation error
  fails it, true dispatches it. Ready steps are dispatched in spec order, at most
  ``max_concurrency`` in flight (0: no limit).
* Success policies: ``all_nodes`` (the first failure fails the run and halts the steps in
  flight), ``final_node`` (failures are tolerated; the run takes the status of the final
  step: the last-declared step nothing depends on; skipped counts as failed),
  ``critical_nodes`` (the run fails as soon as a listed step fails or is skipped because
  its upstream failed).
* ``on_failure: conservative`` runs a failed step again after ``backoff(n)`` ms (a timer),
  at most ``max_replans`` times, before the success policy sees the failure. A step that
  failed before running (its condition or input mapping could not be evaluated) is not
  run again: the same data would give the same error.

State (JSON; the planner never mutates the state it is given)::

    {
      "seq": 7,                       # last seq allocated in the run
      "vars": {...},                  # run variables (planners.common)
      "steps": {name: record},        # every step of the DAG, in spec order
      "running": {"7": "fetch"},      # in-flight seq (as text: JSON keys) -> step
      "done": false,                  # true once the run has an outcome
    }

A step record is ``{"status": s, "runs": n, ...}`` with ``s`` one of ``pending``,
``ready`` (condition passed, waiting for a slot), ``running`` (+ ``seq``), ``waiting``
(a conservative re-run, + ``due_ms`` and the last ``error``), ``succeeded``, ``failed``
(+ ``error``) or ``skipped`` (+ ``reason``: ``"condition false"`` or
``"upstream failed"`` with ``upstream``: the dependency that failed). ``runs`` counts
dispatches. Other top-level keys are preserved, so a planner that wraps a DAG (the LLM
planner) keeps its own keys beside these.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agentflow_core.expressions import (
    CompiledMapping,
    EvaluationError,
    Expression,
    ExpressionError,
    operator_condition_to_cel,
)
from agentflow_core.planners.base import Decision, RunOutcome, StepRequest, StepResult
from agentflow_core.planners.common import (
    DEFAULT_MAX_STEPS,
    Checks,
    CriticalNodes,
    FailurePolicy,
    PlannerImpl,
    SuccessPolicy,
    runaway,
    scope_of,
    with_output,
)
from agentflow_core.planners.models import DagPlannerSpec, DagStep
from agentflow_core.strongly_connected import strongly_connected

CONDITION_FALSE = "condition false"
UPSTREAM_FAILED = "upstream failed"

_FINISHED = frozenset({"succeeded", "failed", "skipped"})
_OPEN = frozenset({"pending", "ready", "running", "waiting"})
#: names an expression may read that are not nodes or agents
_BUILTIN_NAMES = frozenset({"input", "outputs", "last", "steps"})

_STEP_REF_CEL = re.compile(r"\bsteps\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*[\"']([^\"']+)[\"']\s*\])")
#: ``"x" in steps`` (the operator form's ``exists``), not ``"x" in steps.a.result``
_STEP_IN_CEL = re.compile(r"[\"']([^\"']+)[\"']\s+in\s+steps\b(?!\s*[.\[])")
_STEP_REF_JSONPATH = re.compile(r"\$\.steps(?:\.([A-Za-z_][A-Za-z0-9_-]*)|\[\s*[\"']([^\"']+)[\"']\s*\])")


def find_cycles(order: Sequence[str], deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, in declaration order.

    Each cycle starts and ends at the component's first-declared step and follows
    ``depends_on`` edges (``[a, b, a]``: a depends on b, b on a); it is the shortest such
    cycle, so the message stays readable in a large tangle. Unknown names are ignored.
    """
    position = {name: i for i, name in enumerate(order)}
    edges = {name: [d for d in deps.get(name, ()) if d in position] for name in order}

    components = strongly_connected(order, edges)

    cycles: list[list[str]] = []
    for component in components:
        members = set(component)
        start = min(component, key=position.__getitem__)
        if len(component) == 1 and start not in edges[start]:
            continue
        # Breadth-first from the first-declared member: the shortest way back to it.
        parent_of: dict[str, str] = {}
        queue = deque([start])
        found: list[str] | None = None
        while queue and found is None:
            node = queue.popleft()
            for nxt in edges[node]:
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent_of[path[-1]])
                    found = [*reversed(path), start]
                    break
                if nxt in members and nxt not in parent_of:
                    parent_of[nxt] = node
                    queue.append(nxt)
        if found is not None:
            cycles.append(found)
    cycles.sort(key=lambda cycle: position[cycle[0]])
    return cycles


def cycle_text(cycle: Sequence[str]) -> str:
    return "dependency cycle: " + " -> ".join(cycle)


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    agent: str
    deps: tuple[str, ...]
    condition: Expression | None
    #: how the payload's ``input`` is made: the run input, a mapping, or a literal value
    input_kind: Literal["run", "mapping", "literal"]
    input_mapping: CompiledMapping | None
    input_literal: Any
    output: CompiledMapping | None
    #: "all_success": a failed dependency skips the step; "all_done": any outcome of the
    #: dependencies lets the step's condition decide (error handlers, joins)
    trigger: str = "all_success"


def _step_refs(expr: Expression) -> set[str]:
    """Step names an expression reads through ``steps`` (``steps.x``, the operator form)."""
    if expr.kind == "jsonpath":
        return {a or b for a, b in _STEP_REF_JSONPATH.findall(expr.source)}
    if "steps" not in expr.variables:
        return set()
    found = {a or b for a, b in _STEP_REF_CEL.findall(expr.source)}
    found.update(_STEP_IN_CEL.findall(expr.source))
    return found


class DagPlanner(PlannerImpl):
    """A compiled DAG pipeline. Problems go to ``checks``; the constructor never raises."""

    def __init__(
        self,
        pspec: DagPlannerSpec,
        agents: Mapping[str, Any],
        checks: Checks,
        loc: str = "planner",
        *,
        literal_inputs: Mapping[str, Any] | None = None,
    ) -> None:
        self._max_steps = pspec.max_steps
        self._max_concurrency = pspec.max_concurrency
        self._on_failure: FailurePolicy = pspec.on_failure
        self._order: tuple[str, ...] = tuple(pspec.steps)
        literal_inputs = literal_inputs or {}

        names = set(self._order)
        deps: dict[str, tuple[str, ...]] = {}
        agent_of: dict[str, str] = {}
        for name, step in pspec.steps.items():
            where = f"{loc}.steps.{name}"
            if step.agent is None:
                if name not in agents:
                    checks.add(f"{where}.agent", f"no 'agent' given and no agent is named '{name}'")
                agent_of[name] = name
            else:
                if step.agent not in agents:
                    checks.add(f"{where}.agent", f"unknown agent '{step.agent}'")
                agent_of[name] = step.agent
            known: list[str] = []
            for i, dep in enumerate(step.depends_on):
                if dep not in names:
                    checks.add(f"{where}.depends_on.{i}", f"unknown step '{dep}'")
                elif dep in known:
                    checks.add(f"{where}.depends_on.{i}", f"'{dep}' is listed twice")
                else:
                    known.append(dep)
            deps[name] = tuple(known)
        self._deps = deps
        self._agent_of = agent_of

        for cycle in find_cycles(self._order, deps):
            checks.add(f"{loc}.steps", cycle_text(cycle))

        sinks = names - {d for ds in deps.values() for d in ds}
        #: the last-declared step nothing depends on (the last step if every step is
        #: depended on, which only happens with a cycle)
        self.final_step: str = next((n for n in reversed(self._order) if n in sinks), self._order[-1])

        self._policy: Literal["all_nodes", "final_node", "critical_nodes"]
        self._critical: frozenset[str] = frozenset()
        policy: SuccessPolicy = pspec.success_policy
        if isinstance(policy, CriticalNodes):
            self._policy = "critical_nodes"
            self._critical = frozenset(policy.critical_nodes)
            for i, node in enumerate(policy.critical_nodes):
                if node not in names:
                    checks.add(f"{loc}.success_policy.critical_nodes.{i}", f"unknown step '{node}'")
        else:
            self._policy = policy

        ancestors = _Ancestors(deps)
        steps: dict[str, _Step] = {}
        for name, step in pspec.steps.items():
            steps[name] = self._compile_step(name, step, checks, loc, ancestors, literal_inputs)
        self._steps = steps
        self._output = checks.mapping(f"{loc}.output", pspec.output) if pspec.output is not None else None

    @classmethod
    def from_plan(
        cls,
        steps: Mapping[str, DagStep],
        agents: Mapping[str, Any],
        checks: Checks,
        *,
        inputs: Mapping[str, Any] | None = None,
        max_concurrency: int = 0,
        max_steps: int = DEFAULT_MAX_STEPS,
        success_policy: SuccessPolicy = "all_nodes",
        on_failure: FailurePolicy | None = None,
        output: Any = None,
        loc: str = "plan",
    ) -> DagPlanner:
        """A DAG for a plan made at run time (the LLM planner's).

        ``inputs`` are literal JSON per step (never expressions: a plan is data, and its
        text must not be able to read other parts of the run); a step without one gets the
        run input.
        """
        pspec = DagPlannerSpec(
            type="dag",
            steps=dict(steps),
            max_concurrency=max_concurrency,
            max_steps=max_steps,
            success_policy=success_policy,
            on_failure=on_failure or FailurePolicy(),
            output=output,
        )
        return cls(pspec, agents, checks, loc, literal_inputs=inputs or {})

    # --- compile -------------------------------------------------------------------------

    def _compile_step(
        self,
        name: str,
        step: DagStep,
        checks: Checks,
        loc: str,
        ancestors: _Ancestors,
        literal_inputs: Mapping[str, Any],
    ) -> _Step:
        where = f"{loc}.steps.{name}"
        condition: Expression | None = None
        if isinstance(step.condition, str):
            condition = checks.expr(f"{where}.condition", step.condition)
        elif isinstance(step.condition, dict):
            try:
                source = operator_condition_to_cel(step.condition)
            except ExpressionError as exc:
                checks.add(f"{where}.condition", exc.message if exc.message else str(exc))
            else:
                condition = checks.expr(f"{where}.condition", source)
        input_mapping = None
        input_kind: Literal["run", "mapping", "literal"] = "run"
        if name in literal_inputs:
            input_kind = "literal"
        elif step.input is not None:
            input_mapping = checks.mapping(f"{where}.input", step.input)
            input_kind = "mapping" if input_mapping is not None else "run"
        output = checks.mapping(f"{where}.output", step.output) if step.output is not None else None

        before = ancestors.of(name)
        if condition is not None:
            self._check_refs(checks, f"{where}.condition", name, [condition], before, ancestors)
        if input_mapping is not None:
            self._check_refs(checks, f"{where}.input", name, input_mapping.expressions(), before, ancestors)
        if output is not None:
            # The output mapping sees the step's own raw output (by step and agent name).
            self._check_refs(checks, f"{where}.output", name, output.expressions(), before | {name}, ancestors)
        return _Step(
            name=name,
            agent=self._agent_of[name],
            deps=self._deps[name],
            condition=condition,
            input_kind=input_kind,
            input_mapping=input_mapping,
            input_literal=literal_inputs.get(name),
            output=output,
            trigger=step.trigger,
        )

    def _check_refs(
        self,
        checks: Checks,
        loc: str,
        name: str,
        exprs: Sequence[Expression],
        allowed: frozenset[str],
        ancestors: _Ancestors,
    ) -> None:
        """Expressions may read only steps that are guaranteed to have finished first.

        Anything else is a race: whether the value exists depends on scheduling.
        """
        reported: set[str] = set()
        for expr in exprs:
            for ref in sorted(_step_refs(expr)):
                if ref in reported:
                    continue
                if ref not in self._deps:
                    checks.add(loc, f"references unknown step '{ref}' (through 'steps')")
                    reported.add(ref)
                elif ref not in allowed - {name}:
                    checks.add(loc, f"references {ref}, which is not among this step's dependencies (depends_on)")
                    reported.add(ref)
            for ref in sorted(expr.names() - _BUILTIN_NAMES):
                if ref in reported:
                    continue
                if ref in self._deps:
                    if ref not in allowed:
                        checks.add(loc, f"references {ref}, which is not among this step's dependencies (depends_on)")
                        reported.add(ref)
                    continue
                runners = [s for s in self._order if self._agent_of[s] == ref]
                if not runners:
                    continue  # a field of the last output, or an unknown name (a runtime error)
                # An agent name reads that agent's latest output: every step that may have
                # produced it by now must be a dependency, or the value depends on timing.
                descendants = ancestors.descendants(name)
                racing = [s for s in runners if s not in allowed and s not in descendants and s != name]
                if racing or not any(s in allowed for s in runners):
                    who = racing[0] if racing else runners[0]
                    checks.add(
                        loc,
                        f"references {ref}, which is not among this step's dependencies (depends_on)"
                        f" (agent '{ref}' is run by step '{who}')",
                    )
                    reported.add(ref)

    # --- runtime -------------------------------------------------------------------------

    def begin(
        self,
        run_input: Any,
        now_ms: int,
        seq0: int,
        variables: dict[str, Any],
        failure: str | None,
    ) -> Decision:
        # ``failure`` (why an earlier plan gave up) changes nothing in a fixed DAG.
        state: dict[str, Any] = {
            "seq": seq0,
            "vars": variables,
            "steps": {name: {"status": "pending", "runs": 0} for name in self._order},
            "running": {},
            "done": False,
        }
        work = _Work(self, state, run_input, now_ms)
        work.advance()
        return work.decision()

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any, now_ms: int) -> Decision:
        name = None if state.get("done") else state["running"].get(str(result.seq))
        if name is None:
            return Decision(state=state, ignored=True, wake_at_ms=self.wake_at(state))
        work = _Work(self, state, run_input, now_ms)
        del work.running[str(result.seq)]
        step = self._steps[name]
        if result.status == "succeeded":
            output = result.output
            ok = True
            if step.output is not None:
                raw_vars = with_output(work.vars, name, step.agent, output)
                try:
                    output = step.output.evaluate(scope_of(raw_vars, run_input, {"steps": work.view()}))
                except EvaluationError as exc:
                    work.step_failed(name, f"output mapping: {exc}", rerunnable=True)
                    ok = False
            if ok:
                work.vars = with_output(work.vars, name, step.agent, output)
                work.set(name, {"status": "succeeded", "runs": work.runs(name)})
        else:
            work.step_failed(name, result.error or f"step {result.status}", rerunnable=True)
        work.advance()
        return work.decision()

    def on_timer(self, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision:
        due = not state.get("done") and any(
            rec["status"] == "waiting" and rec["due_ms"] <= now_ms for rec in state["steps"].values()
        )
        if not due:
            return Decision(state=state, ignored=True, wake_at_ms=self.wake_at(state))
        work = _Work(self, state, run_input, now_ms)
        work.advance()
        return work.decision()

    @staticmethod
    def wake_at(state: Mapping[str, Any]) -> int | None:
        """The earliest pending re-run time, or None."""
        if state.get("done"):
            return None
        due = [rec["due_ms"] for rec in state["steps"].values() if rec["status"] == "waiting"]
        return min(due) if due else None


class _Ancestors:
    """Transitive dependencies (and dependents), computed on demand and memoised."""

    def __init__(self, deps: Mapping[str, Sequence[str]]) -> None:
        self._deps = deps
        self._memo: dict[str, frozenset[str]] = {}
        self._dependents: dict[str, list[str]] | None = None
        self._down: dict[str, frozenset[str]] = {}

    def of(self, name: str) -> frozenset[str]:
        found = self._memo.get(name)
        if found is None:
            found = frozenset(self._walk(name, self._deps))
            self._memo[name] = found
        return found

    def descendants(self, name: str) -> frozenset[str]:
        if self._dependents is None:
            self._dependents = {n: [] for n in self._deps}
            for n, ds in self._deps.items():
                for d in ds:
                    self._dependents[d].append(n)
        found = self._down.get(name)
        if found is None:
            found = frozenset(self._walk(name, self._dependents))
            self._down[name] = found
        return found

    @staticmethod
    def _walk(start: str, edges: Mapping[str, Sequence[str]]) -> set[str]:
        # Iterative and cycle-safe: the spec may still contain a cycle at this point.
        seen: set[str] = set()
        todo = list(edges.get(start, ()))
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        seen.discard(start)
        return seen


class _Work:
    """One decision under construction, over shallow copies of the state's changing parts.

    Step records are replaced, never edited, so the caller's state stays intact.
    """

    def __init__(self, planner: DagPlanner, state: dict[str, Any], run_input: Any, now_ms: int) -> None:
        self.p = planner
        self.base = state
        self.run_input = run_input
        self.now_ms = now_ms
        self.seq: int = state["seq"]
        self.vars: dict[str, Any] = state["vars"]
        self.steps: dict[str, dict[str, Any]] = dict(state["steps"])
        self.running: dict[str, str] = dict(state["running"])
        self.done: bool = bool(state.get("done"))
        self.dispatch: list[StepRequest] = []
        self.cancel: list[int] = []
        self.outcome: RunOutcome | None = None
        self._view: dict[str, Any] | None = None

    # --- records ---

    def runs(self, name: str) -> int:
        return int(self.steps[name].get("runs", 0))

    def set(self, name: str, record: dict[str, Any]) -> None:
        self.steps[name] = record
        self._view = None

    def view(self) -> dict[str, Any]:
        """The ``steps`` expressions see: finished steps only."""
        if self._view is None:
            outputs = self.vars["outputs"]
            view: dict[str, Any] = {}
            for name in self.p._order:
                rec = self.steps[name]
                status = rec["status"]
                if status == "succeeded":
                    view[name] = {"status": status, "result": outputs.get(name)}
                elif status == "failed":
                    view[name] = {"status": status, "error": rec.get("error")}
                elif status == "skipped":
                    view[name] = {"status": status, "reason": rec.get("reason")}
            self._view = view
        return self._view

    def _scope_extras(self) -> dict[str, Any]:
        return {"steps": self.view()}

    # --- failures ---

    def fail_run(self, error: str) -> None:
        batch = {req.seq for req in self.dispatch}
        self.cancel = sorted(int(s) for s in self.running if int(s) not in batch)
        self.running = {}
        self.dispatch = []
        self.done = True
        self.outcome = RunOutcome("failed", None, error)

    def step_failed(self, name: str, error: str, *, rerunnable: bool) -> None:
        runs = self.runs(name)
        policy = self.p._on_failure
        if rerunnable and policy.policy == "conservative" and runs - 1 < policy.max_replans:
            due = self.now_ms + policy.backoff(max(runs - 1, 0))
            self.set(name, {"status": "waiting", "runs": runs, "due_ms": due, "error": error})
            return
        self.set(name, {"status": "failed", "runs": runs, "error": error})
        if self.p._policy == "all_nodes":
            self.fail_run(f"step '{name}' failed: {error}")
        elif self.p._policy == "critical_nodes" and name in self.p._critical:
            self.fail_run(f"critical step '{name}' failed: {error}")

    def _blocked_by(self, name: str) -> str | None:
        for dep in self.p._deps[name]:
            rec = self.steps[dep]
            if rec["status"] == "failed" or (rec["status"] == "skipped" and rec.get("reason") == UPSTREAM_FAILED):
                return dep
        return None

    # --- progress ---

    def advance(self) -> None:
        while not self.done:
            changed = self._promote_due()
            changed = self._resolve_pending() or changed
            if self.done:
                break
            changed = self._dispatch_ready() or changed
            if not changed:
                break
        if not self.done:
            self._maybe_finish()

    def _promote_due(self) -> bool:
        changed = False
        for name in self.p._order:
            rec = self.steps[name]
            if rec["status"] == "waiting" and rec["due_ms"] <= self.now_ms:
                self.set(name, {"status": "ready", "runs": rec.get("runs", 0)})
                changed = True
        return changed

    def _resolve_pending(self) -> bool:
        changed = False
        for name in self.p._order:
            if self.done:
                return changed
            rec = self.steps[name]
            if rec["status"] != "pending":
                continue
            step = self.p._steps[name]
            if any(self.steps[d]["status"] not in _FINISHED for d in step.deps):
                continue
            changed = True
            blocker = self._blocked_by(name) if step.trigger == "all_success" else None
            if blocker is not None:
                self.set(name, {"status": "skipped", "runs": 0, "reason": UPSTREAM_FAILED, "upstream": blocker})
                if self.p._policy == "critical_nodes" and name in self.p._critical:
                    self.fail_run(f"critical step '{name}' was skipped: step '{blocker}' failed")
                continue
            if step.condition is not None:
                scope = scope_of(self.vars, self.run_input, self._scope_extras())
                try:
                    passed = step.condition.test(scope)
                except EvaluationError as exc:
                    self.step_failed(name, f"condition: {exc}", rerunnable=False)
                    continue
                if not passed:
                    self.set(name, {"status": "skipped", "runs": 0, "reason": CONDITION_FALSE})
                    continue
            self.set(name, {"status": "ready", "runs": 0})
        return changed

    def _payload_last(self, step: _Step) -> Any:
        outputs = self.vars["outputs"]
        if not step.deps:
            return None
        if len(step.deps) == 1:
            dep = step.deps[0]
            return outputs.get(dep) if self.steps[dep]["status"] == "succeeded" else None
        return {d: outputs.get(d) for d in step.deps if self.steps[d]["status"] == "succeeded"}

    def _dispatch_ready(self) -> bool:
        changed = False
        limit = self.p._max_concurrency
        for name in self.p._order:
            if self.done:
                return changed
            if limit and len(self.running) >= limit:
                break
            rec = self.steps[name]
            if rec["status"] != "ready":
                continue
            step = self.p._steps[name]
            changed = True
            if step.input_kind == "mapping" and step.input_mapping is not None:
                scope = scope_of(self.vars, self.run_input, self._scope_extras())
                try:
                    payload_input = step.input_mapping.evaluate(scope)
                except EvaluationError as exc:
                    self.step_failed(name, f"input mapping: {exc}", rerunnable=False)
                    continue
            elif step.input_kind == "literal":
                payload_input = step.input_literal
            else:
                payload_input = self.run_input
            seq = self.seq + 1
            if seq > self.p._max_steps:
                self.fail_run(runaway(self.p._max_steps))
                return changed
            self.seq = seq
            runs = int(rec.get("runs", 0)) + 1
            self.set(name, {"status": "running", "runs": runs, "seq": seq})
            self.running[str(seq)] = name
            payload = {"input": payload_input, "last": self._payload_last(step)}
            self.dispatch.append(StepRequest(seq, name, step.agent, payload))
        return changed

    def _maybe_finish(self) -> None:
        if any(self.steps[n]["status"] in _OPEN for n in self.p._order):
            return
        self.done = True
        if self.p._policy == "final_node":
            final = self.p.final_step
            rec = self.steps[final]
            if rec["status"] == "failed":
                self.outcome = RunOutcome("failed", None, f"final step '{final}' failed: {rec.get('error')}")
                return
            if rec["status"] == "skipped":
                why = rec.get("reason")
                if why == UPSTREAM_FAILED:
                    why = f"step '{rec.get('upstream')}' failed"
                self.outcome = RunOutcome("failed", None, f"final step '{final}' was skipped ({why})")
                return
        outputs = self.vars["outputs"]
        if self.p._output is not None:
            scope = scope_of(self.vars, self.run_input, self._scope_extras())
            try:
                value = self.p._output.evaluate(scope)
            except EvaluationError as exc:
                self.outcome = RunOutcome("failed", None, f"run output: {exc}")
                return
        else:
            value = {n: outputs.get(n) for n in self.p._order if self.steps[n]["status"] == "succeeded"}
        self.outcome = RunOutcome("succeeded", value)

    def decision(self) -> Decision:
        state = {
            **self.base,
            "seq": self.seq,
            "vars": self.vars,
            "steps": self.steps,
            "running": self.running,
            "done": self.done,
        }
        return Decision(
            state=state,
            dispatch=self.dispatch,
            outcome=self.outcome,
            cancel=self.cancel,
            wake_at_ms=DagPlanner.wake_at(state),
        )
