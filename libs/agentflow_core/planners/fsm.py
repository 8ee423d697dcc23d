"""Finite-state-machine planner: one step at a time, explicit transitions.

State::

    {"current": <state or None>, "seq": <seq of the in-flight step>, "vars": {...},
     "visits": {state: n}, "failed": [states whose step failed], "replans": {state: n},
     "waiting_until": <ms, while a conservative re-run waits>}

Order of transitions after a step succeeds: the state's ``router`` (a named routing
function), then ``conditional_transitions`` (first true wins), then ``condition``
(``on_true``/``on_false``), then ``on_success``. After a failure: ``on_timeout`` (for a
timeout), then ``on_error``; with neither, the run fails. An expression that cannot be
evaluated (a missing field) takes the error path with the evaluation error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from agentflow_core.expressions import CompiledMapping, EvaluationError, Expression, Scope
from agentflow_core.planners.base import Decision, RunOutcome, StepRequest, StepResult
from agentflow_core.planners.common import (
    Checks,
    CriticalNodes,
    PlannerImpl,
    runaway,
    scope_of,
    with_output,
)
from agentflow_core.planners.models import FinalState, FsmPlannerSpec, FsmState

Router = Callable[[Any, Scope], str]
ROUTING_GROUP = "agentflow.routing"


def load_router(name: str) -> Router | None:
    """A routing function registered in the ``agentflow.routing`` entry-point group."""
    for ep in entry_points(group=ROUTING_GROUP):
        if ep.name == name:
            loaded: Router = ep.load()
            return loaded
    return None


@dataclass(slots=True)
class _State:
    name: str
    agent: str | None
    spec: FsmState
    input: CompiledMapping | None
    output: CompiledMapping | None
    transitions: list[tuple[Expression, str]]
    #: all CEL transitions folded into one program returning the index of the first
    #: true condition (or -1): one evaluation instead of one per condition
    chooser: Expression | None
    condition: Expression | None
    router: Router | None


class FsmPlanner(PlannerImpl):
    def __init__(self, pspec: FsmPlannerSpec, agents: Mapping[str, Any], checks: Checks, loc: str = "planner") -> None:
        self._spec = pspec
        self._finals: dict[str, FinalState] = pspec.finals()
        self._final_outputs: dict[str, CompiledMapping] = {}
        self._output = checks.mapping(f"{loc}.output", pspec.output) if pspec.output is not None else None
        self._states: dict[str, _State] = {}
        self._max_steps = pspec.max_steps
        policy = pspec.success_policy
        self._critical = frozenset(policy.critical_nodes) if isinstance(policy, CriticalNodes) else None
        self._all_nodes = policy == "all_nodes"
        self._failure = pspec.on_failure
        self._keep_outputs = True
        self._compile(agents, checks, loc)

    # --- compile ---------------------------------------------------------------------

    def _compile(self, agents: Mapping[str, Any], checks: Checks, loc: str) -> None:
        spec = self._spec
        finals = self._finals
        for dup in sorted(set(finals) & set(spec.states)):
            checks.add(f"{loc}.final_states", f"'{dup}' is both a state and a final state")
        if spec.initial_state not in spec.states:
            checks.add(f"{loc}.initial_state", f"unknown state '{spec.initial_state}'")
        targets = set(spec.states) | set(finals)
        for name, final in finals.items():
            if final.output is not None:
                compiled = checks.mapping(f"{loc}.final_states.{name}.output", final.output)
                if compiled is not None:
                    self._final_outputs[name] = compiled
        if isinstance(spec.success_policy, CriticalNodes):
            for node in spec.success_policy.critical_nodes:
                if node not in spec.states:
                    checks.add(f"{loc}.success_policy.critical_nodes", f"unknown state '{node}'")

        for name, st in spec.states.items():
            here = f"{loc}.states.{name}"
            agent = st.agent
            if agent is None and st.condition is None and st.router is None:
                if name in agents:
                    agent = name  # the seed's style: a state named after its agent
                else:
                    checks.add(f"{here}.agent", f"state has no agent, and no agent is named '{name}'")
            elif agent is not None and agent not in agents:
                checks.add(f"{here}.agent", f"unknown agent '{agent}'")
            for field in ("on_success", "on_error", "on_timeout", "on_true", "on_false"):
                target = getattr(st, field)
                if target is not None and target not in targets:
                    checks.add(f"{here}.{field}", f"unknown state '{target}'")
            for i, tr in enumerate(st.conditional_transitions):
                if tr.target not in targets:
                    checks.add(f"{here}.conditional_transitions.{i}.target", f"unknown state '{tr.target}'")
            if st.condition is not None and (st.on_true is None or st.on_false is None):
                checks.add(f"{here}.condition", "a condition needs both on_true and on_false")
            if (st.on_true is not None or st.on_false is not None) and st.condition is None:
                checks.add(f"{here}.on_true", "on_true/on_false need a condition")
            needs_next = agent is not None and st.condition is None and st.router is None
            if needs_next and st.on_success is None and not st.conditional_transitions:
                checks.add(f"{here}.on_success", "state needs on_success (or conditional_transitions)")
            router: Router | None = None
            if st.router is not None:
                router_name = st.router.removeprefix("func:")
                router = load_router(router_name)
                if router is None:
                    checks.add(
                        f"{here}.router",
                        f"no routing function '{router_name}' in the '{ROUTING_GROUP}' entry-point group",
                    )
            self._states[name] = _State(
                name=name,
                agent=agent,
                spec=st,
                input=checks.mapping(f"{here}.input", st.input) if st.input is not None else None,
                output=checks.mapping(f"{here}.output", st.output) if st.output is not None else None,
                transitions=[
                    (e, tr.target)
                    for i, tr in enumerate(st.conditional_transitions)
                    if (e := checks.expr(f"{here}.conditional_transitions.{i}.condition", tr.condition)) is not None
                ],
                condition=checks.expr(f"{here}.condition", st.condition) if st.condition is not None else None,
                router=router,
                chooser=None,
            )
            entry = self._states[name]
            conds = [e for e, _ in entry.transitions]
            if len(conds) > 1 and all(e.kind == "cel" for e in conds):
                # Left to right, stopping at the first true one: the same order and the
                # same errors as evaluating them one by one.
                folded = "-1"
                for i in reversed(range(len(conds))):
                    folded = f"(({conds[i].source}) ? {i} : {folded})"
                entry.chooser = Expression(folded)
        if checks.errors:
            return
        self._keep_outputs = self._uses_outputs()
        self._check_graph(agents, checks, loc)

    def _edges(self, name: str) -> list[str]:
        st = self._spec.states[name]
        out = [t for t in (st.on_success, st.on_error, st.on_timeout, st.on_true, st.on_false) if t is not None]
        out += [tr.target for tr in st.conditional_transitions]
        if st.router is not None:
            # A router may pick any state: treat every state and final as a successor.
            out += [*self._spec.states, *self._finals]
        return out

    def _check_graph(self, agents: Mapping[str, Any], checks: Checks, loc: str) -> None:
        spec = self._spec
        edges = {name: self._edges(name) for name in spec.states}
        seen = {spec.initial_state}
        queue = deque([spec.initial_state])
        while queue:
            for target in edges.get(queue.popleft(), ()):
                if target not in seen:
                    seen.add(target)
                    queue.append(target)
        for name in spec.states:
            if name not in seen:
                checks.add(f"{loc}.states.{name}", "state is unreachable from the initial state")
        for name in self._finals:
            if name not in seen:
                checks.add(f"{loc}.final_states", f"final state '{name}' is unreachable")
        # No path to a final state: the run could only end by a loop guard.
        reverse: dict[str, list[str]] = {}
        for src, targets in edges.items():
            for t in targets:
                reverse.setdefault(t, []).append(src)
        can_finish = set(self._finals)
        queue = deque(self._finals)
        while queue:
            for src in reverse.get(queue.popleft(), ()):
                if src not in can_finish:
                    can_finish.add(src)
                    queue.append(src)
        for name in spec.states:
            if name in seen and name not in can_finish:
                checks.add(f"{loc}.states.{name}", "no path from this state to a final state")

        # References to outputs that cannot exist yet: a state may read outputs of states
        # that can run before it (ancestors), and after its own step, its own.
        ancestors: dict[str, set[str]] = {}
        for name in spec.states:
            found: set[str] = set()
            queue = deque(reverse.get(name, ()))
            while queue:
                src = queue.popleft()
                if src not in found and src in spec.states:
                    found.add(src)
                    queue.extend(reverse.get(src, ()))
            ancestors[name] = found
        runs_agent: dict[str, set[str]] = {}
        for name, st in self._states.items():
            if st.agent is not None:
                runs_agent.setdefault(st.agent, set()).add(name)

        def check(expr: Expression, where: str, allowed: set[str]) -> None:
            for ref in sorted(expr.names()):
                producers = {ref} if ref in spec.states else runs_agent.get(ref)
                if producers is None:
                    continue  # input/outputs/last, or a field of the last output
                if not producers & allowed:
                    checks.add(where, f"{expr.source!r} reads the output of '{ref}', which cannot have run by then")

        for name, st in self._states.items():
            here = f"{loc}.states.{name}"
            before = ancestors[name]
            after = before | ({name} if st.agent is not None else set())
            if st.input is not None:
                for e in st.input.expressions():
                    check(e, f"{here}.input", before)
            for i, (e, _) in enumerate(st.transitions):
                check(e, f"{here}.conditional_transitions.{i}.condition", after)
            if st.condition is not None:
                check(st.condition, f"{here}.condition", after)
            if st.output is not None:
                for e in st.output.expressions():
                    check(e, f"{here}.output", after)

    def _uses_outputs(self) -> bool:
        """Whether any expression can read an output other than the last one."""
        names = set(self._spec.states) | {st.agent for st in self._states.values() if st.agent} | {"outputs"}
        exprs: list[Expression] = []
        for st in self._states.values():
            exprs += [e for e, _ in st.transitions]
            exprs += [st.condition] if st.condition is not None else []
            for mapping in (st.input, st.output):
                exprs += mapping.expressions() if mapping is not None else []
        for mapping in (*self._final_outputs.values(), self._output):
            exprs += mapping.expressions() if mapping is not None else []
        routers = any(st.router is not None for st in self._states.values())
        return routers or any(e.kind == "jsonpath" or e.names() & names for e in exprs)

    def keep_outputs(self) -> None:
        self._keep_outputs = True

    def _record(self, variables: dict[str, Any], node: str, agent: str | None, output: Any) -> dict[str, Any]:
        if self._keep_outputs:
            return with_output(variables, node, agent, output)
        # Nothing reads earlier outputs: keep only the last one, so the state (written
        # on every step) stays the same size however long the run gets.
        return {"outputs": {}, "agents": {}, "last": output, "last_node": node}

    # --- run -------------------------------------------------------------------------

    def begin(self, run_input: Any, now_ms: int, seq0: int, variables: dict[str, Any], failure: str | None) -> Decision:
        state: dict[str, Any] = {"current": None, "seq": seq0, "vars": variables}
        state.update(visits={}, failed=[], replans={})
        return self._enter(self._spec.initial_state, state, run_input, now_ms, via_error=False, error=None)

    def _fail(self, state: dict[str, Any], error: str) -> Decision:
        return Decision(
            state={**state, "current": None},
            outcome=RunOutcome("failed", state["vars"]["last"], error),
        )

    def _finish(self, name: str, state: dict[str, Any], run_input: Any, via_error: bool, error: str | None) -> Decision:
        state = {**state, "current": name}
        final = self._finals[name]
        failed = state["failed"]
        if final.status is not None:
            status = final.status
        elif self._critical is not None:
            status = "failed" if any(s in self._critical for s in failed) else "succeeded"
        elif self._all_nodes:
            status = "failed" if failed or via_error else "succeeded"
        else:
            status = "failed" if via_error else "succeeded"
        mapping = self._final_outputs.get(name) or self._output
        output = state["vars"]["last"]
        if mapping is not None:
            try:
                output = mapping.evaluate(scope_of(state["vars"], run_input))
            except EvaluationError as exc:
                return Decision(state=state, outcome=RunOutcome("failed", output, f"final state '{name}': {exc}"))
        if status == "failed":
            reason = error or f"run ended in final state '{name}'"
            if failed and not error:
                reason = f"state(s) {', '.join(failed)} failed"
            return Decision(state=state, outcome=RunOutcome("failed", output, reason))
        return Decision(state=state, outcome=RunOutcome("succeeded", output))

    def _enter(
        self, name: str, state: dict[str, Any], run_input: Any, now_ms: int, *, via_error: bool, error: str | None
    ) -> Decision:
        # Decision states (condition only) are evaluated here without a step; the hop
        # counter bounds a loop made only of them.
        hops = 0
        while True:
            if name in self._finals:
                return self._finish(name, state, run_input, via_error, error)
            st = self._states[name]
            limit = st.spec.max_visits
            if limit is not None:
                visits = state["visits"].get(name, 0) + 1
                if visits > limit:
                    return self._fail(state, f"state '{name}' entered more than max_visits={limit} times (loop guard)")
                state = {**state, "visits": {**state["visits"], name: visits}}
            hops += 1
            if hops > self._max_steps:
                return self._fail(state, runaway(self._max_steps))
            if st.agent is not None:
                return self._dispatch(st, state, run_input, now_ms)
            # A pure decision: condition and/or router, no agent.
            target, err = self._route_after_success(st, state, run_input)
            if target is None:
                target, via_error, error = self._error_target(st, "failed"), True, err
                if target is None:
                    return self._fail({**state, "current": name}, err or f"state '{name}' has nowhere to go")
            name = target

    def _dispatch(self, st: _State, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision:
        seq = state["seq"] + 1
        if seq > self._max_steps:
            return self._fail(state, runaway(self._max_steps))
        variables = state["vars"]
        payload_input = run_input
        if st.input is not None:
            try:
                payload_input = st.input.evaluate(scope_of(variables, run_input))
            except EvaluationError as exc:
                state = {**state, "current": st.name}
                return self._failed(st, state, "failed", f"input mapping: {exc}", run_input, now_ms)
        assert st.agent is not None
        request = StepRequest(seq, st.name, st.agent, {"input": payload_input, "last": variables["last"]})
        return Decision(state={**state, "current": st.name, "seq": seq}, dispatch=[request])

    def _route_after_success(self, st: _State, state: dict[str, Any], run_input: Any) -> tuple[str | None, str | None]:
        """The next state after ``st`` succeeded, or (None, error) for the error path."""
        scope = scope_of(state["vars"], run_input)
        try:
            if st.router is not None:
                target = st.router(state["vars"]["last"], scope)
                if target not in self._states and target not in self._finals:
                    return None, f"router '{st.spec.router}' chose unknown state {target!r}"
                return target, None
            if st.chooser is not None:
                try:
                    index = st.chooser.evaluate(scope)
                except EvaluationError:
                    index = None  # find which condition failed, for the message
                if index is not None and index >= 0:
                    return st.transitions[int(index)][1], None
                if index is None:
                    for expr, target in st.transitions:
                        if expr.test(scope):
                            return target, None
            else:
                for expr, target in st.transitions:
                    if expr.test(scope):
                        return target, None
            if st.condition is not None:
                return (st.spec.on_true if st.condition.test(scope) else st.spec.on_false), None
        except EvaluationError as exc:
            return None, str(exc)
        if st.spec.on_success is None:
            return None, f"no transition matched in state '{st.name}'"
        return st.spec.on_success, None

    @staticmethod
    def _error_target(st: _State, status: str) -> str | None:
        if status == "timeout" and st.spec.on_timeout is not None:
            return st.spec.on_timeout
        return st.spec.on_error

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any, now_ms: int) -> Decision:
        current = state.get("current")
        if result.seq != state.get("seq") or current not in self._states or "waiting_until" in state:
            return Decision(state=state, ignored=True)
        st = self._states[current]
        if result.status != "succeeded":
            error = result.error or f"step '{current}' {result.status}"
            return self._failed(st, state, result.status, error, run_input, now_ms)
        output = result.output
        variables = self._record(state["vars"], current, st.agent, output)
        if st.output is not None:
            try:
                output = st.output.evaluate(scope_of(variables, run_input))
            except EvaluationError as exc:
                return self._failed(st, state, "failed", f"output mapping: {exc}", run_input, now_ms)
            variables = self._record(state["vars"], current, st.agent, output)
        state = {**state, "vars": variables}
        target, err = self._route_after_success(st, state, run_input)
        if target is None:
            return self._failed(st, state, "failed", err or "no transition", run_input, now_ms)
        return self._enter(target, state, run_input, now_ms, via_error=False, error=None)

    def _failed(
        self, st: _State, state: dict[str, Any], status: str, error: str, run_input: Any, now_ms: int
    ) -> Decision:
        if self._failure.policy == "conservative":
            done = state["replans"].get(st.name, 0)
            if done < self._failure.max_replans:
                until = now_ms + self._failure.backoff(done)
                replans = {**state["replans"], st.name: done + 1}
                return Decision(state={**state, "replans": replans, "waiting_until": until}, wake_at_ms=until)
        failed = state["failed"] if st.name in state["failed"] else [*state["failed"], st.name]
        state = {**state, "failed": failed}
        target = self._error_target(st, status)
        if target is None:
            return self._fail(state, error)
        return self._enter(target, state, run_input, now_ms, via_error=True, error=error)

    def on_timer(self, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision:
        until = state.get("waiting_until")
        current = state.get("current")
        if until is None or current not in self._states:
            return Decision(state=state, ignored=True)
        if now_ms < until:
            return Decision(state=state, wake_at_ms=until)
        state = {k: v for k, v in state.items() if k != "waiting_until"}
        return self._dispatch(self._states[current], state, run_input, now_ms)
