"""Behavior-tree planner: BehaviorTree.CPP v4 node semantics, ticked by events over JSON state.

The tree is ticked from the root when the run starts, on every step result and on every
due timer; between events nothing runs. An action dispatches a step on its first tick
and stays RUNNING until that step's result arrives. Halting a node halts its running
descendants; a halted action's step is cancelled and its late result is ignored.

State (plain JSON, never mutated in place; node keys are preorder indexes as strings)::

    {
      "seq": 7,                       # last seq allocated
      "vars": {...},                  # run variables (see planners.common)
      "status": "running",            # "succeeded" / "failed" once the run ended
      "active": {"0": 1, "4": 7},     # memory of each RUNNING node (nothing else)
      "inflight": {"7": 4},           # seq of each step in flight -> its action's index
      "timers": {"5": 1700000000000}, # timer per node: timeout deadline, retry re-tick
      "resume": {"2": 1},             # sequence_with_memory: child to resume at
    }

Memory in ``active``, by node type: action: its step's seq; sequence / fallback: the
current child; reactive_*: the running child; parallel: ``{"done": [positions], "ok",
"ko"}``; conditional_selector: the chosen branch; retry: ``{"failed": n, "waiting":
bool}``; repeat: passes completed; timeout: the deadline; inverter / force_* /
sequence_with_memory: 1. ``resume`` outlives the RUNNING status on purpose: like
BT.CPP's SequenceWithMemory, a failed child is where the next tick starts.

Deviations from BT.CPP, each forced by event-driven ticking or chosen for safety:

* retry always waits for the next tick (``wake_at_ms = now``) between attempts, so the
  engine can check budgets between them; BT.CPP loops in the same tick for sync children.
* repeat stops early with SUCCESS when a pass that started and finished within one tick
  changed nothing: every further pass would see the same data and do the same.
* reactive_sequence / reactive_fallback may have only one child that can return
  RUNNING (contains an action or a retry); BT.CPP v4 throws at runtime when a second
  one runs, we refuse such trees when compiling.
* timeout: a result arriving at or after the deadline loses; the child is halted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from agentflow_core.expressions import RESERVED, CompiledMapping, EvaluationError, Expression, Scope
from agentflow_core.planners.base import Decision, RunOutcome, StepRequest, StepResult
from agentflow_core.planners.common import Checks, PlannerImpl, runaway, scope_of, with_output
from agentflow_core.planners.models import BT_CONTROLS, BT_DECORATORS, BtNode, BtPlannerSpec

RUNNING: Final = 0
SUCCESS: Final = 1
FAILURE: Final = 2

_COMMON_FIELDS = frozenset({"type", "name", "description"})
#: the fields each node type takes (besides type/name/description), required ones first
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "action": (("agent",), ("input", "output")),
    "condition": (("check",), ()),
    "conditional_selector": (("conditions",), ()),
    "parallel": (("children",), ("success_threshold", "failure_threshold", "success_policy")),
    "retry": (("child", "max_attempts"), ()),
    "repeat": (("child", "times"), ()),
    "timeout": (("child", "seconds"), ()),
}
for _kind in BT_CONTROLS:
    _FIELDS.setdefault(_kind, (("children",), ()))
for _kind in BT_DECORATORS:
    _FIELDS.setdefault(_kind, (("child",), ()))

_LOOPS = frozenset({"repeat", "retry"})
_REACTIVE = frozenset({"reactive_sequence", "reactive_fallback"})


class _Runaway(Exception):
    """Dispatching would exceed max_steps: the tick is abandoned and the run fails."""


class _Node:
    __slots__ = (
        "agent",
        "branches",
        "check",
        "children",
        "end",
        "failure_threshold",
        "input",
        "is_async",
        "key",
        "kind",
        "label",
        "limit",
        "loc",
        "loops",
        "ms",
        "name",
        "out_name",
        "output",
        "seconds",
        "success_threshold",
    )

    def __init__(self, kind: str, label: str, loc: str, key: str, name: str | None) -> None:
        self.kind = kind
        self.label = label
        self.loc = loc
        self.key = key
        self.name = name
        self.children: tuple[int, ...] = ()
        #: preorder index one past this node's subtree
        self.end = 0
        #: indexes of the repeat/retry ancestors: their subtrees run more than once
        self.loops: tuple[int, ...] = ()
        #: whether the subtree can return RUNNING (holds an action or a retry)
        self.is_async = False
        self.agent = ""
        self.out_name = ""
        self.input: CompiledMapping | None = None
        self.output: CompiledMapping | None = None
        self.check: Expression | None = None
        #: conditional_selector: (expression, or None for the default, child index)
        self.branches: tuple[tuple[Expression | None, int], ...] = ()
        self.success_threshold = 1
        self.failure_threshold = 1
        self.limit = 1
        self.ms = 0
        self.seconds = 0.0


class _Tick:
    """The mutable working copy of the state during one event."""

    __slots__ = (
        "active",
        "cancel",
        "dispatch",
        "error",
        "inflight",
        "new_seqs",
        "now",
        "result",
        "resume",
        "resume_writes",
        "run_input",
        "scope_cache",
        "seq",
        "timers",
        "vars",
    )

    def __init__(self, state: dict[str, Any], run_input: Any, now: int, result: StepResult | None) -> None:
        self.seq: int = state["seq"]
        self.vars: dict[str, Any] = state["vars"]
        self.active: dict[str, Any] = dict(state["active"])
        self.inflight: dict[str, int] = dict(state["inflight"])
        self.timers: dict[str, int] = dict(state["timers"])
        self.resume: dict[str, int] = dict(state["resume"])
        self.resume_writes = 0
        self.run_input = run_input
        self.now = now
        self.result = result
        self.dispatch: list[StepRequest] = []
        self.new_seqs: set[int] = set()
        self.cancel: list[int] = []
        #: why the most recent FAILURE happened (names the node)
        self.error: str | None = None
        self.scope_cache: tuple[dict[str, Any], Scope] | None = None

    def scope(self) -> Scope:
        # Reactive nodes evaluate many conditions per tick over the same variables.
        cached = self.scope_cache
        if cached is None or cached[0] is not self.vars:
            cached = (self.vars, scope_of(self.vars, self.run_input))
            self.scope_cache = cached
        return cached[1]


def _wake(timers: Mapping[str, int]) -> int | None:
    return min(timers.values()) if timers else None


class BtPlanner(PlannerImpl):
    """A compiled behavior tree. Problems go to ``checks``; the constructor never raises."""

    def __init__(self, pspec: BtPlannerSpec, agents: Mapping[str, Any], checks: Checks, loc: str = "planner") -> None:
        self._max_steps = pspec.max_steps
        self._agents = agents
        self._checks = checks
        self._nodes: list[_Node] = []
        self._names: dict[str, int] = {}
        #: (owner index, loc, expression, whether the owner's own output may be read)
        self._exprs: list[tuple[int, str, Expression, bool]] = []
        self._compile(pspec.root, f"{loc}.root", "root", ())
        self._output: CompiledMapping | None = None
        if pspec.output is not None:
            self._output = checks.mapping(f"{loc}.output", pspec.output)
            if self._output is not None:
                for expr in self._output.expressions():
                    self._exprs.append((len(self._nodes), f"{loc}.output", expr, False))
        self._check_references()
        table: dict[str, Callable[[_Tick, int], int]] = {
            "action": self._t_action,
            "condition": self._t_condition,
            "sequence": self._t_sequence,
            "sequence_with_memory": self._t_sequence_with_memory,
            "reactive_sequence": self._t_reactive_sequence,
            "fallback": self._t_fallback,
            "selector": self._t_fallback,
            "reactive_fallback": self._t_reactive_fallback,
            "parallel": self._t_parallel,
            "conditional_selector": self._t_conditional_selector,
            "inverter": self._t_inverter,
            "force_success": self._t_force_success,
            "force_failure": self._t_force_failure,
            "retry": self._t_retry,
            "repeat": self._t_repeat,
            "timeout": self._t_timeout,
        }
        self._fns: list[Callable[[_Tick, int], int]] = [table[node.kind] for node in self._nodes]

    # --- compiling ------------------------------------------------------------------

    def _compile(self, spec: BtNode, loc: str, path: str, loops: tuple[int, ...]) -> int:
        checks = self._checks
        i = len(self._nodes)
        node = _Node(spec.type, spec.name or path, loc, str(i), spec.name)
        node.loops = loops
        self._nodes.append(node)
        kind = spec.type

        if spec.name is not None:
            if spec.name in RESERVED:
                checks.add(f"{loc}.name", f"'{spec.name}' is reserved for expressions ({', '.join(RESERVED)})")
            elif spec.name in self._names:
                first = self._nodes[self._names[spec.name]].loc
                checks.add(f"{loc}.name", f"duplicate node name '{spec.name}' (also used at {first})")
            else:
                self._names[spec.name] = i

        required, optional = _FIELDS[kind]
        for field in type(spec).model_fields:
            if field in _COMMON_FIELDS or field in required or field in optional:
                continue
            value = getattr(spec, field)
            if value is not None:
                checks.add(f"{loc}.{field}", f"'{field}' does not apply to a {kind} node")
        for field in required:
            if getattr(spec, field) is None:
                checks.add(f"{loc}.{field}", f"a {kind} node needs '{field}'")

        if kind == "action":
            if spec.agent is not None:
                node.agent = spec.agent
                if spec.agent not in self._agents:
                    known = ", ".join(sorted(self._agents)) or "none"
                    checks.add(f"{loc}.agent", f"unknown agent '{spec.agent}' (declared: {known})")
            node.out_name = spec.name or node.agent
            node.is_async = True
            if spec.input is not None:
                node.input = self._mapping(i, f"{loc}.input", spec.input, own_output=False)
            if spec.output is not None:
                node.output = self._mapping(i, f"{loc}.output", spec.output, own_output=True)
        elif kind == "condition":
            if spec.check is not None:
                node.check = checks.expr(f"{loc}.check", spec.check)
                if node.check is not None:
                    self._exprs.append((i, f"{loc}.check", node.check, False))
        elif kind == "conditional_selector":
            self._compile_branches(node, spec, path, loops)
        elif kind in BT_DECORATORS:
            inner = (*loops, i) if kind in _LOOPS else loops
            if spec.child is not None:
                node.children = (self._compile(spec.child, f"{loc}.child", f"{path}/0", inner),)
            node.limit = spec.max_attempts or spec.times or 1
            node.seconds = spec.seconds or 0.0
            node.ms = max(1, round(node.seconds * 1000))
            node.is_async = kind == "retry"
        else:
            children = spec.children or []
            if spec.children is not None and not children:
                checks.add(f"{loc}.children", f"a {kind} node needs at least one child")
            node.children = tuple(
                self._compile(child, f"{loc}.children.{pos}", f"{path}/{pos}", loops)
                for pos, child in enumerate(children)
            )
            if kind == "parallel":
                self._compile_thresholds(node, spec)
            if kind in _REACTIVE:
                self._check_reactive(node)

        node.is_async = node.is_async or any(self._nodes[c].is_async for c in node.children)
        node.end = len(self._nodes)
        return i

    def _mapping(self, owner: int, loc: str, spec: Any, own_output: bool) -> CompiledMapping | None:
        compiled = self._checks.mapping(loc, spec)
        if compiled is not None:
            for expr in compiled.expressions():
                self._exprs.append((owner, loc, expr, own_output))
        return compiled

    def _compile_branches(self, node: _Node, spec: BtNode, path: str, loops: tuple[int, ...]) -> None:
        checks = self._checks
        conditions = spec.conditions or []
        if spec.conditions is not None and not conditions:
            checks.add(f"{node.loc}.conditions", "a conditional_selector needs at least one condition")
        i = int(node.key)
        branches: list[tuple[Expression | None, int]] = []
        children: list[int] = []
        defaults = 0
        for b, branch in enumerate(conditions):
            bloc = f"{node.loc}.conditions.{b}"
            expr: Expression | None = None
            if branch.default:
                defaults += 1
                if branch.expression is not None:
                    checks.add(f"{bloc}.expression", "a default branch takes no expression")
                if defaults > 1:
                    checks.add(f"{bloc}.default", "only one branch may be the default")
                elif b != len(conditions) - 1:
                    checks.add(f"{bloc}.default", "the default branch must be the last one")
            elif branch.expression is None:
                checks.add(bloc, "a branch needs an 'expression' or 'default: true'")
            else:
                expr = checks.expr(f"{bloc}.expression", branch.expression)
                if expr is not None:
                    self._exprs.append((i, f"{bloc}.expression", expr, False))
            child = self._compile(branch.child, f"{bloc}.child", f"{path}/{b}", loops)
            children.append(child)
            branches.append((expr, child))
        node.children = tuple(children)
        node.branches = tuple(branches)

    def _compile_thresholds(self, node: _Node, spec: BtNode) -> None:
        checks = self._checks
        n = len(node.children)
        loc = node.loc

        def resolve(field: str, value: int, verb: str) -> int:
            if value == -1:
                return n
            if value == 0 or value < -1:
                checks.add(f"{loc}.{field}", f"must be -1 (all children) or between 1 and {n}, got {value}")
            elif value > n:
                checks.add(f"{loc}.{field}", f"{value} is more than the {n} children: the parallel could never {verb}")
            return max(1, min(value, n))

        if spec.success_threshold is not None and spec.success_policy is not None:
            checks.add(f"{loc}.success_policy", "give 'success_policy' or 'success_threshold', not both")
        if spec.success_threshold is not None:
            success = resolve("success_threshold", spec.success_threshold, "succeed")
        elif spec.success_policy is not None:
            policy = spec.success_policy
            value = -1 if policy == "all" else 1 if policy == "one" else int(policy)
            success = resolve("success_policy", value, "succeed")
        else:
            success = n
        if spec.failure_threshold is not None:
            failure = resolve("failure_threshold", spec.failure_threshold, "fail")
        else:
            # BT.CPP fails a parallel once success is out of reach (n - failures < success);
            # the threshold that says exactly that is n - success + 1.
            failure = n - success + 1
        node.success_threshold = success
        node.failure_threshold = max(1, failure)

    def _check_reactive(self, node: _Node) -> None:
        seen = False
        for pos, child in enumerate(node.children):
            if not self._nodes[child].is_async:
                continue
            if seen:
                self._checks.add(
                    f"{node.loc}.children.{pos}",
                    f"a {node.kind} re-ticks its children from the first on every tick, so only one child may "
                    "contain actions or retries (BehaviorTree.CPP v4 refuses a second running child); "
                    "group them in a sequence",
                )
            seen = True

    def _check_references(self) -> None:
        producers: dict[str, list[int]] = {}
        for i, node in enumerate(self._nodes):
            if node.kind == "action":
                producers.setdefault(node.out_name, []).append(i)
                if node.agent and node.agent != node.out_name:
                    producers.setdefault(node.agent, []).append(i)
        for owner, loc, expr, own_output in self._exprs:
            for name in sorted(expr.names()):
                if name in RESERVED or (name not in self._names and name not in self._agents):
                    continue
                found = producers.get(name)
                if not found:
                    named = self._names.get(name)
                    if named is not None and name not in self._agents:
                        kind = self._nodes[named].kind
                        self._checks.add(loc, f"references '{name}', a {kind} node, which has no output")
                    else:
                        self._checks.add(
                            loc,
                            f"references output of '{name}', which cannot have run before this node "
                            "(no action of this tree runs it)",
                        )
                elif not any(self._may_precede(q, owner, own_output) for q in found):
                    self._checks.add(loc, f"references output of '{name}', which cannot have run before this node")

    def _may_precede(self, producer: int, owner: int, own_output: bool) -> bool:
        if producer < owner or (own_output and producer == owner):
            return True
        if owner >= len(self._nodes):
            return True
        # In a repeat/retry subtree, a later node may have run in an earlier pass.
        return any(loop < producer < self._nodes[loop].end for loop in self._nodes[owner].loops)

    # --- events ---------------------------------------------------------------------

    def begin(
        self,
        run_input: Any,
        now_ms: int,
        seq0: int,
        variables: dict[str, Any],
        failure: str | None,
    ) -> Decision:
        state: dict[str, Any] = {
            "seq": seq0,
            "vars": variables,
            "status": "running",
            "active": {},
            "inflight": {},
            "timers": {},
            "resume": {},
        }
        return self._run(state, run_input, now_ms, None)

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any, now_ms: int) -> Decision:
        if state.get("status") != "running" or str(result.seq) not in state["inflight"]:
            return self._ignore(state)
        return self._run(state, run_input, now_ms, result)

    def on_timer(self, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision:
        if state.get("status") != "running":
            return self._ignore(state)
        wake = _wake(state["timers"])
        if wake is None or wake > now_ms:
            # Nothing is due: with unchanged data a tick would change nothing.
            return self._ignore(state)
        return self._run(state, run_input, now_ms, None)

    @staticmethod
    def _ignore(state: dict[str, Any]) -> Decision:
        # Restate the pending timer: a decision's wake_at_ms replaces the previous one.
        running = state.get("status") == "running"
        return Decision(state=state, ignored=True, wake_at_ms=_wake(state["timers"]) if running else None)

    def _run(self, state: dict[str, Any], run_input: Any, now: int, result: StepResult | None) -> Decision:
        ctx = _Tick(state, run_input, now, result)
        try:
            status = self._fns[0](ctx, 0)
        except _Runaway:
            # The tick is abandoned: nothing it dispatched goes out, everything earlier stops.
            done = result.seq if result is not None else None
            cancel = sorted(int(s) for s in state["inflight"] if int(s) != done)
            return Decision(
                state=self._ended(ctx, "failed"),
                outcome=RunOutcome("failed", self._run_output(ctx)[0], runaway(self._max_steps)),
                cancel=cancel,
            )
        if status == RUNNING:
            new_state = {
                "seq": ctx.seq,
                "vars": ctx.vars,
                "status": "running",
                "active": ctx.active,
                "inflight": ctx.inflight,
                "timers": ctx.timers,
                "resume": ctx.resume,
            }
            return Decision(state=new_state, dispatch=ctx.dispatch, cancel=ctx.cancel, wake_at_ms=_wake(ctx.timers))
        # Halting made this empty already; whatever remains is stopped all the same.
        for skey in list(ctx.inflight):
            del ctx.inflight[skey]
            self._stop_step(ctx, int(skey))
        output, output_error = self._run_output(ctx)
        if status == SUCCESS and output_error is None:
            outcome = RunOutcome("succeeded", output)
        elif status == SUCCESS:
            outcome = RunOutcome("failed", None, output_error)
        else:
            root = self._nodes[0]
            outcome = RunOutcome("failed", output, ctx.error or f"{root.kind} '{root.label}' failed")
        return Decision(
            state=self._ended(ctx, outcome.status), dispatch=ctx.dispatch, outcome=outcome, cancel=sorted(ctx.cancel)
        )

    def _ended(self, ctx: _Tick, status: str) -> dict[str, Any]:
        return {
            "seq": ctx.seq,
            "vars": ctx.vars,
            "status": status,
            "active": {},
            "inflight": {},
            "timers": {},
            "resume": {},
        }

    def _run_output(self, ctx: _Tick) -> tuple[Any, str | None]:
        if self._output is None:
            return ctx.vars["outputs"], None
        try:
            return self._output.evaluate(ctx.scope()), None
        except EvaluationError as exc:
            return None, f"run output: {exc}"

    # --- halting --------------------------------------------------------------------

    def _halt(self, ctx: _Tick, i: int) -> None:
        node = self._nodes[i]
        memory = ctx.active.pop(node.key, None)
        if memory is None:
            return
        ctx.timers.pop(node.key, None)
        if node.kind == "action":
            ctx.inflight.pop(str(memory), None)
            self._stop_step(ctx, memory)
        else:
            self._halt_children(ctx, i)

    @staticmethod
    def _stop_step(ctx: _Tick, seq: int) -> None:
        if seq in ctx.new_seqs:
            # Dispatched and halted within one tick: it never leaves the planner.
            ctx.dispatch = [step for step in ctx.dispatch if step.seq != seq]
            ctx.new_seqs.discard(seq)
        elif ctx.result is None or ctx.result.seq != seq:
            ctx.cancel.append(seq)

    def _halt_children(self, ctx: _Tick, i: int) -> None:
        active = ctx.active
        for child in self._nodes[i].children:
            if self._nodes[child].key in active:
                self._halt(ctx, child)

    # --- leaves ---------------------------------------------------------------------

    def _t_action(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        seq = ctx.active.get(node.key)
        if seq is not None:
            result = ctx.result
            if result is None or result.seq != seq:
                return RUNNING
            del ctx.active[node.key]
            del ctx.inflight[str(seq)]
            return self._finish_action(ctx, node, result)
        step_input = ctx.run_input
        if node.input is not None:
            try:
                step_input = node.input.evaluate(ctx.scope())
            except EvaluationError as exc:
                ctx.error = f"action '{node.label}': input mapping failed: {exc}"
                return FAILURE
        seq = ctx.seq + 1
        if seq > self._max_steps:
            raise _Runaway
        ctx.seq = seq
        ctx.dispatch.append(StepRequest(seq, node.label, node.agent, {"input": step_input, "last": ctx.vars["last"]}))
        ctx.new_seqs.add(seq)
        ctx.active[node.key] = seq
        ctx.inflight[str(seq)] = i
        return RUNNING

    def _finish_action(self, ctx: _Tick, node: _Node, result: StepResult) -> int:
        if result.status != "succeeded":
            detail = f": {result.error}" if result.error else ""
            ctx.error = f"action '{node.label}' (agent '{node.agent}') {result.status}{detail}"
            return FAILURE
        output = result.output
        if node.output is not None:
            # The mapping sees the raw output as this node's output and as `last`.
            raw = with_output(ctx.vars, node.out_name, node.agent, output)
            try:
                output = node.output.evaluate(scope_of(raw, ctx.run_input))
            except EvaluationError as exc:
                ctx.error = f"action '{node.label}': output mapping failed: {exc}"
                return FAILURE
        ctx.vars = with_output(ctx.vars, node.out_name, node.agent, output)
        return SUCCESS

    def _t_condition(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        check = node.check
        if check is None:
            return FAILURE
        try:
            if check.test(ctx.scope()):
                return SUCCESS
        except EvaluationError as exc:
            ctx.error = f"condition '{node.label}': {exc}"
            return FAILURE
        ctx.error = f"condition '{node.label}' is false: {check.source}"
        return FAILURE

    # --- controls -------------------------------------------------------------------

    def _t_sequence(self, ctx: _Tick, i: int) -> int:
        return self._ordered(ctx, i, SUCCESS)

    def _t_fallback(self, ctx: _Tick, i: int) -> int:
        return self._ordered(ctx, i, FAILURE)

    def _ordered(self, ctx: _Tick, i: int, go_on: int) -> int:
        """Sequence (go on while children succeed) or fallback (while they fail)."""
        node = self._nodes[i]
        children = node.children
        fns = self._fns
        pos: int = ctx.active.get(node.key, 0)
        while pos < len(children):
            child = children[pos]
            status = fns[child](ctx, child)
            if status == RUNNING:
                ctx.active[node.key] = pos
                return RUNNING
            if status != go_on:
                # The earlier children are done and idle: there is nothing to halt.
                ctx.active.pop(node.key, None)
                return status
            pos += 1
        ctx.active.pop(node.key, None)
        return go_on

    def _t_sequence_with_memory(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        children = node.children
        fns = self._fns
        pos = ctx.resume.get(node.key, 0)
        start = pos
        while pos < len(children):
            child = children[pos]
            status = fns[child](ctx, child)
            if status == RUNNING:
                ctx.active[node.key] = 1
                self._set_resume(ctx, node.key, pos, start)
                return RUNNING
            if status == FAILURE:
                # Unlike a sequence, the failed child is where the next tick resumes.
                ctx.active.pop(node.key, None)
                self._set_resume(ctx, node.key, pos, start)
                return FAILURE
            pos += 1
        ctx.active.pop(node.key, None)
        self._set_resume(ctx, node.key, 0, start)
        return SUCCESS

    @staticmethod
    def _set_resume(ctx: _Tick, key: str, pos: int, old: int) -> None:
        if pos == old:
            return
        ctx.resume_writes += 1
        if pos:
            ctx.resume[key] = pos
        else:
            ctx.resume.pop(key, None)

    def _t_reactive_sequence(self, ctx: _Tick, i: int) -> int:
        return self._reactive(ctx, i, SUCCESS)

    def _t_reactive_fallback(self, ctx: _Tick, i: int) -> int:
        return self._reactive(ctx, i, FAILURE)

    def _reactive(self, ctx: _Tick, i: int, go_on: int) -> int:
        """Reactive sequence/fallback: every tick starts again at the first child."""
        node = self._nodes[i]
        fns = self._fns
        running = ctx.active.get(node.key)
        for pos, child in enumerate(node.children):
            status = fns[child](ctx, child)
            if status == RUNNING:
                if running is not None and running != pos:
                    self._halt(ctx, node.children[running])
                ctx.active[node.key] = pos
                return RUNNING
            if status != go_on:
                # e.g. a condition before the running action turned false: halt the action.
                self._halt_children(ctx, i)
                ctx.active.pop(node.key, None)
                return status
        ctx.active.pop(node.key, None)
        return go_on

    def _t_parallel(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        memory = ctx.active.get(node.key)
        if memory is None:
            done: list[int] = []
            ok = ko = 0
        else:
            done = list(memory["done"])
            ok = memory["ok"]
            ko = memory["ko"]
        skip = set(done)
        n = len(node.children)
        need = node.success_threshold
        fns = self._fns
        for pos, child in enumerate(node.children):
            if pos in skip:
                continue
            status = fns[child](ctx, child)
            if status == RUNNING:
                continue
            done.append(pos)
            if status == SUCCESS:
                ok += 1
            else:
                ko += 1
            # Checked after each child, as BT.CPP does: later children are not ticked.
            if ok >= need:
                ctx.active.pop(node.key, None)
                self._halt_children(ctx, i)
                return SUCCESS
            if n - ko < need or ko >= node.failure_threshold:
                ctx.active.pop(node.key, None)
                self._halt_children(ctx, i)
                return FAILURE
        if memory is None or ok != memory["ok"] or ko != memory["ko"]:
            ctx.active[node.key] = {"done": sorted(done), "ok": ok, "ko": ko}
        return RUNNING

    def _t_conditional_selector(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        chosen = ctx.active.get(node.key)
        if chosen is None:
            scope = ctx.scope()
            for b, (expr, _child) in enumerate(node.branches):
                if expr is None:
                    chosen = b
                    break
                try:
                    if expr.test(scope):
                        chosen = b
                        break
                except EvaluationError as exc:
                    ctx.error = f"conditional_selector '{node.label}': {exc}"
                    return FAILURE
            else:
                ctx.error = f"conditional_selector '{node.label}': no condition is true and there is no default"
                return FAILURE
        child = node.branches[chosen][1]
        status = self._fns[child](ctx, child)
        if status == RUNNING:
            ctx.active[node.key] = chosen
        else:
            ctx.active.pop(node.key, None)
        return status

    # --- decorators -----------------------------------------------------------------

    def _child(self, ctx: _Tick, node: _Node) -> int:
        child = node.children[0]
        return self._fns[child](ctx, child)

    def _t_inverter(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        status = self._child(ctx, node)
        if status == RUNNING:
            ctx.active[node.key] = 1
            return RUNNING
        ctx.active.pop(node.key, None)
        if status == SUCCESS:
            ctx.error = f"inverter '{node.label}': its child succeeded"
            return FAILURE
        return SUCCESS

    def _t_force_success(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        status = self._child(ctx, node)
        if status == RUNNING:
            ctx.active[node.key] = 1
            return RUNNING
        ctx.active.pop(node.key, None)
        return SUCCESS

    def _t_force_failure(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        status = self._child(ctx, node)
        if status == RUNNING:
            ctx.active[node.key] = 1
            return RUNNING
        ctx.active.pop(node.key, None)
        ctx.error = f"force_failure '{node.label}'"
        return FAILURE

    def _t_retry(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        memory = ctx.active.get(node.key)
        failed = 0
        if memory is not None:
            failed = memory["failed"]
            if memory["waiting"]:
                ctx.timers.pop(node.key, None)
        status = self._child(ctx, node)
        if status == RUNNING:
            if memory is None or memory["waiting"]:
                ctx.active[node.key] = {"failed": failed, "waiting": False}
            return RUNNING
        if status == SUCCESS:
            ctx.active.pop(node.key, None)
            return SUCCESS
        failed += 1
        if failed < node.limit:
            # The next attempt starts on the next tick, so the engine sees every attempt.
            ctx.active[node.key] = {"failed": failed, "waiting": True}
            ctx.timers[node.key] = ctx.now
            return RUNNING
        ctx.active.pop(node.key, None)
        why = ctx.error or f"'{node.label}' failed"
        ctx.error = f"{why} (retry '{node.label}' gave up after {node.limit} attempts)"
        return FAILURE

    def _t_repeat(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        child_key = self._nodes[node.children[0]].key
        passes = ctx.active.get(node.key, 0)
        while True:
            fresh = child_key not in ctx.active
            variables = ctx.vars
            writes = ctx.resume_writes
            status = self._child(ctx, node)
            if status == RUNNING:
                ctx.active[node.key] = passes
                return RUNNING
            if status == FAILURE:
                ctx.active.pop(node.key, None)
                return FAILURE
            passes += 1
            if passes >= node.limit or (fresh and ctx.vars is variables and ctx.resume_writes == writes):
                # A pass that began and ended in this tick without changing any data would
                # be followed by identical passes: stop instead of spinning.
                ctx.active.pop(node.key, None)
                return SUCCESS

    def _t_timeout(self, ctx: _Tick, i: int) -> int:
        node = self._nodes[i]
        deadline = ctx.active.get(node.key)
        if deadline is None:
            deadline = ctx.now + node.ms
            ctx.active[node.key] = deadline
            ctx.timers[node.key] = deadline
        elif ctx.now >= deadline:
            # The deadline wins over a result arriving in the same event.
            self._halt(ctx, i)
            ctx.error = f"timeout '{node.label}': timed out after {node.seconds:g}s"
            return FAILURE
        status = self._child(ctx, node)
        if status != RUNNING:
            ctx.active.pop(node.key, None)
            ctx.timers.pop(node.key, None)
        return status
