"""Compiling a workflow's planner spec into a planner, and the failure-policy wrapper.

``compile_planner`` builds the planner for ``spec.planner`` (recursively for fallback
plans), collecting every static problem before raising one ValidationFailed.

:class:`Supervised` wraps a plan whose failure has somewhere to go:

* ``escalate`` (or an LLM plan the model could not produce): switch to ``fallback``;
* ``adaptive``: ask an LLM planner (``on_failure.replanner``) for a new plan, given the
  failure;
* ``conservative`` on a behavior tree: run the tree again after a backoff (FSM and DAG
  planners re-run just the failed step themselves).

The new plan continues the run: it allocates seqs after the old plan's and sees its
outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agentflow_core.planners.base import Decision, Planner, StepResult
from agentflow_core.planners.common import Checks, PlannerImpl, check_failure_policy
from agentflow_core.planners.models import (
    BtPlannerSpec,
    DagPlannerSpec,
    FsmPlannerSpec,
    LlmPlannerSpec,
)

if TYPE_CHECKING:
    from agentflow_core.spec import WorkflowSpec

AnyPlannerSpec = FsmPlannerSpec | BtPlannerSpec | DagPlannerSpec | LlmPlannerSpec


def compile_planner(spec: WorkflowSpec) -> Planner:
    checks = Checks()
    planner = build_planner(spec.planner, spec.agents, checks, "planner")
    checks.raise_if_any()
    return planner


def _construct(pspec: AnyPlannerSpec, agents: Mapping[str, Any], checks: Checks, loc: str) -> PlannerImpl:
    if isinstance(pspec, FsmPlannerSpec):
        from agentflow_core.planners.fsm import FsmPlanner

        return FsmPlanner(pspec, agents, checks, loc)
    if isinstance(pspec, BtPlannerSpec):
        from agentflow_core.planners.bt import BtPlanner

        return BtPlanner(pspec, agents, checks, loc)
    if isinstance(pspec, DagPlannerSpec):
        from agentflow_core.planners.dag import DagPlanner

        return DagPlanner(pspec, agents, checks, loc)
    from agentflow_core.planners.llm import LlmPlanner

    return LlmPlanner(pspec, agents, checks, loc)


def build_planner(pspec: AnyPlannerSpec, agents: Mapping[str, Any], checks: Checks, loc: str) -> PlannerImpl:
    main = _construct(pspec, agents, checks, loc)
    fallback_spec = pspec.fallback if not isinstance(pspec.fallback, str) else None
    policy = pspec.on_failure
    check_failure_policy(checks, policy, fallback_spec is not None or isinstance(pspec, LlmPlannerSpec))
    fallback: PlannerImpl | None = None
    if fallback_spec is not None:
        fallback = build_planner(fallback_spec, agents, checks, f"{loc}.fallback")
    elif policy.policy == "adaptive" and policy.replanner:
        try:
            replanner = LlmPlannerSpec.model_validate({"type": "llm", **policy.replanner})
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                where = ".".join(str(p) for p in err["loc"])
                checks.add(f"{loc}.on_failure.replanner.{where}", err["msg"])
        else:
            fallback = build_planner(replanner, agents, checks, f"{loc}.on_failure.replanner")
    escalates = fallback is not None and (
        policy.policy in ("escalate", "adaptive") or isinstance(pspec, LlmPlannerSpec)
    )
    restarts = policy.policy == "conservative" and isinstance(pspec, BtPlannerSpec)
    if not escalates and not restarts:
        return main
    if escalates:
        main.keep_outputs()
    return Supervised(
        main,
        fallback if escalates else None,
        llm_only=isinstance(pspec, LlmPlannerSpec),
        restarts=policy.max_replans if restarts else 0,
        backoff=policy.backoff,
    )


class Supervised(PlannerImpl):
    """Runs ``main``; on its failure restarts it (after a backoff) or hands over to ``fallback``.

    State: ``{"phase": "main"|"waiting"|"fallback", "inner": <active plan's state>,
    "restarts": n, "resume_at": ms, "failure": str, "seq", "vars"}``.
    """

    def __init__(
        self,
        main: PlannerImpl,
        fallback: PlannerImpl | None,
        *,
        llm_only: bool,
        restarts: int,
        backoff: Any,
    ) -> None:
        self._main = main
        self._fallback = fallback
        self._llm_only = llm_only
        self._restarts = restarts
        self._backoff = backoff

    @staticmethod
    def _wrap(phase: str, inner: dict[str, Any], restarts: int, **extra: Any) -> dict[str, Any]:
        return {
            "phase": phase,
            "inner": inner,
            "restarts": restarts,
            "seq": inner.get("seq", 0),
            "vars": inner.get("vars"),
            **extra,
        }

    def _after(self, phase: str, restarts: int, decision: Decision, run_input: Any, now_ms: int) -> Decision:
        outcome = decision.outcome
        wrapped = Decision(
            state=self._wrap(phase, decision.state, restarts),
            dispatch=decision.dispatch,
            outcome=outcome,
            ignored=decision.ignored,
            cancel=decision.cancel,
            wake_at_ms=decision.wake_at_ms,
        )
        if decision.ignored or outcome is None or outcome.status != "failed" or phase != "main":
            return wrapped
        inner = decision.state
        failure = outcome.error or "plan failed"
        if restarts < self._restarts:
            # Conservative: wait, then run the whole plan again (on_timer).
            resume_at = now_ms + int(self._backoff(restarts))
            return Decision(
                state=self._wrap("waiting", inner, restarts + 1, resume_at=resume_at, failure=failure),
                cancel=decision.cancel,
                wake_at_ms=resume_at,
            )
        if self._fallback is None or (self._llm_only and not inner.get("fallback_wanted")):
            return wrapped
        taken = self._fallback.begin(run_input, now_ms, int(inner.get("seq", 0)), inner["vars"], failure)
        return Decision(
            state=self._wrap("fallback", taken.state, restarts, escalated_from=failure),
            dispatch=taken.dispatch,
            outcome=taken.outcome,
            cancel=[*decision.cancel, *taken.cancel],
            wake_at_ms=taken.wake_at_ms,
        )

    def begin(self, run_input: Any, now_ms: int, seq0: int, variables: dict[str, Any], failure: str | None) -> Decision:
        return self._after("main", 0, self._main.begin(run_input, now_ms, seq0, variables, failure), run_input, now_ms)

    def _active(self, phase: str) -> PlannerImpl:
        if phase == "fallback":
            assert self._fallback is not None
            return self._fallback
        return self._main

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any, now_ms: int) -> Decision:
        phase = state["phase"]
        if phase == "waiting":
            return Decision(state=state, ignored=True, wake_at_ms=state["resume_at"])
        decision = self._active(phase).on_result(state["inner"], result, run_input, now_ms)
        return self._carry(state, self._after(phase, state["restarts"], decision, run_input, now_ms))

    @staticmethod
    def _carry(old: dict[str, Any], decision: Decision) -> Decision:
        # Keep why the plan escalated, for as long as the fallback runs.
        if "escalated_from" in old and "escalated_from" not in decision.state:
            decision = replace(decision, state={**decision.state, "escalated_from": old["escalated_from"]})
        return decision

    def on_timer(self, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision:
        phase = state["phase"]
        if phase == "waiting":
            if now_ms < state["resume_at"]:
                return Decision(state=state, wake_at_ms=state["resume_at"])
            inner = state["inner"]
            decision = self._main.begin(run_input, now_ms, int(inner.get("seq", 0)), inner["vars"], state["failure"])
            return self._after("main", state["restarts"], decision, run_input, now_ms)
        decision = self._active(phase).on_timer(state["inner"], run_input, now_ms)
        return self._carry(state, self._after(phase, state["restarts"], decision, run_input, now_ms))


__all__ = ["Supervised", "build_planner", "compile_planner"]
