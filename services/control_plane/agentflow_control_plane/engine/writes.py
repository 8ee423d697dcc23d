"""Bulk writes of one engine transaction: steps, envelopes, outbox rows, run updates.

Everything a decision produces is collected in a :class:`WriteSet` and flushed as ONE
statement (data-modifying CTEs over ``unnest`` of arrays), whatever the batch size, so
the per-step cost on the hot path is a few list appends rather than a round trip.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from agentflow_bus import tracing as otel
from agentflow_bus.subjects import Names
from agentflow_control_plane.governance import audit_store
from agentflow_control_plane.governance.budgets import RESERVATION_CASTS, WINDOW_CASTS, BudgetBook, Refusal, usd
from agentflow_control_plane.governance.estimates import Costing
from agentflow_control_plane.tracing import dispatch_traceparent
from agentflow_core.envelope import ENVELOPE_VERSION, seal
from agentflow_core.planners import StepRequest
from agentflow_core.spec import WorkflowSpec, inline_agent, workflow_tools_of

#: the actor of entries the engine writes on its own
ENGINE = "system:engine"

#: set when a statement queued run events: wakes this process's event sequencer at once
#: (the sequencer also polls, for events other control planes queue)
EVENTS_QUEUED = asyncio.Event()


def step_id_for(run_id: uuid.UUID, seq: int) -> uuid.UUID:
    """Deterministic step id, so replaying a run yields the same ids."""
    return uuid.uuid5(run_id, f"step:{seq}")


def traceparent_for(run_id: uuid.UUID, trace: str | None = None) -> str:
    """W3C trace context of a step message while tracing is off: one trace per run (that of
    the run's stored ``trace``; the run id for runs without one), a fresh span per message."""
    if trace is not None and len(trace) == 55:
        return f"00-{trace[3:35]}-{os.urandom(8).hex()}-{trace[53:]}"
    return f"00-{run_id.hex}-{os.urandom(8).hex()}-01"


@dataclass(slots=True)
class OutMsg:
    tenant: str
    run_id: uuid.UUID
    subject: str
    msg_id: str
    body: bytes
    traceparent: str
    outbox_id: int = 0


@dataclass(slots=True)
class WriteSet:
    names: Names
    now: datetime
    new_steps: list[tuple[Any, ...]] = field(default_factory=list)
    envelopes: list[tuple[Any, ...]] = field(default_factory=list)
    #: what result envelopes report having spent, and the tool calls they made
    usages: list[tuple[Any, ...]] = field(default_factory=list)
    tool_calls: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[OutMsg] = field(default_factory=list)
    # (id, status, attempt, attempts, pickups_before, worker, started_at, finished_at,
    #  next_attempt_at, output_json, error, step_hash, result_hash, queued_at)
    step_updates: list[tuple[Any, ...]] = field(default_factory=list)
    # run id -> (status, planner_state_json, output_json, error, started_at, finished_at, wake_at)
    run_updates: dict[uuid.UUID, tuple[Any, ...]] = field(default_factory=dict)
    #: steps halted by a decision and not loaded in memory: cancelled if still active
    cancel_steps: list[uuid.UUID] = field(default_factory=list)
    #: messages for workers, published on the cancel subject after commit
    cancel_notices: list[dict[str, Any]] = field(default_factory=list)
    #: audit entries, queued by the same statement (the sealer chains them)
    audits: list[audit_store.QueuedEntry] = field(default_factory=list)
    #: cost ledger rows (see ``add_spend``)
    ledger: list[tuple[Any, ...]] = field(default_factory=list)
    #: False only in dev mode with ``AGENTFLOW_GOVERNANCE=off`` (the benchmark baseline)
    governance: bool = True
    #: per-step estimates (calibration, reservations); None when no run here can cost anything
    costing: Costing | None = None
    #: the locked budget windows, when a tenant here has budgets
    budgets: BudgetBook | None = None
    #: calibration: (step, attempt, tenant, run, agent, route, raw prompt, raw completion, tokens, usd, at)
    step_estimates: list[tuple[Any, ...]] = field(default_factory=list)
    #: calibration: (step, attempt, models, prompt, completion, usd) of successful LLM attempts
    observations: list[tuple[Any, ...]] = field(default_factory=list)
    #: runs ended by this write set whose active steps not loaded in memory are cancelled
    halt_runs: list[uuid.UUID] = field(default_factory=list)
    #: step id -> the ``budget`` of its next envelope (what it reserved)
    limits: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    #: run events (tenant, run, workflow, step, type, data json, at), queued by the same statement
    events: list[tuple[Any, ...]] = field(default_factory=list)

    def attach_budgets(self, book: BudgetBook | None) -> None:
        self.budgets = book
        if book is not None:
            book.audit = self._budget_audit

    def _budget_audit(self, tenant: str, action: str, resource: str, data: dict[str, Any]) -> None:
        self.audit(tenant, action, resource, data)
        run = data.get("run")
        if run is not None:
            self.event(tenant, uuid.UUID(run), None, action, {k: v for k, v in data.items() if k != "run"})

    def event(
        self,
        tenant: str,
        run_id: uuid.UUID,
        workflow: str | None,
        kind: str,
        data: dict[str, Any],
        step_id: uuid.UUID | None = None,
    ) -> None:
        """Queue a run event for the event stream (see :mod:`agentflow_control_plane.events`)."""
        self.events.append((tenant, run_id, workflow, step_id, kind, orjson.dumps(data).decode(), self.now))

    def admit_steps(
        self, spec: WorkflowSpec, tenant: str, run_id: uuid.UUID, workflow: str, requests: Sequence[StepRequest]
    ) -> Refusal | None:
        """Estimate the steps a decision dispatches (their first attempts) and reserve their
        worst cases in the run's hard budgets, all or nothing. A refusal means: dispatch none."""
        costing = self.costing
        if costing is None or not requests:
            return None
        items: list[tuple[uuid.UUID, int, str, Any, int]] = []
        estimates: list[tuple[Any, ...]] = []
        for req in requests:
            agent = spec.agents[req.agent] if req.inline_agent is None else inline_agent(req.inline_agent)
            est = costing.estimator.step(spec, req.agent, agent, req.payload, costing.corrections.get(tenant))
            if est is None:
                continue
            step_id = step_id_for(run_id, req.seq)
            if est.model is not None and self.governance:
                estimates.append(
                    (step_id, 1, tenant, run_id, req.agent, est.model, est.raw_prompt_tokens,
                     est.raw_completion_tokens, est.total_tokens, str(usd(est.cost_usd)), self.now)
                )  # fmt: skip
            attempts = max(est.attempts, 1)
            items.append((step_id, 1, req.agent, usd(est.max_cost_usd * RESERVATION_HEADROOM / attempts),
                          math.ceil(est.max_tokens_total * RESERVATION_HEADROOM / attempts)))  # fmt: skip
        book = self.budgets
        if book is not None and items:
            before = len(book.new_reservations)
            refusal = book.reserve(items, tenant=tenant, run_id=run_id, workflow=workflow)
            if refusal is not None:
                return refusal
            for res in book.new_reservations[before:]:
                self.limits[res.step_id] = {"max_cost_usd": float(res.usd), "max_tokens": res.tokens}
        self.step_estimates.extend(estimates)
        return None

    def reserve_retry(
        self, tenant: str, run_id: uuid.UUID, workflow: str, agent: str, step_id: uuid.UUID, attempt: int
    ) -> Refusal | None:
        """Reserve for attempt ``attempt`` what attempt ``attempt - 1`` held (its envelope,
        re-sealed by the timers, carries the same ``budget``)."""
        book = self.budgets
        if book is None:
            return None
        amount = book.retry_amount(step_id, attempt - 1)
        if amount is None:
            return None
        return book.reserve([(step_id, attempt, agent, *amount)], tenant=tenant, run_id=run_id, workflow=workflow)

    def audit(self, tenant: str, action: str, resource: str, data: dict[str, Any], actor: str = ENGINE) -> None:
        if self.governance:
            self.audits.append(audit_store.queued(tenant, self.now, actor, action, resource, data))

    def add_envelope(
        self,
        tenant: str,
        run_id: uuid.UUID,
        step_id: uuid.UUID,
        attempt: int,
        kind: str,
        digest: str,
        body: bytes,
    ) -> None:
        self.envelopes.append((tenant, run_id, step_id, attempt, kind, digest, body))

    def add_spend(
        self, run_id: uuid.UUID, step_id: uuid.UUID, body: dict[str, Any], *, workflow: str, agent: str
    ) -> None:
        """Record a result envelope's ``usage`` and ``tool_calls`` (already shape-checked):
        the step's totals, each tool call, a ledger row per LLM and tool call, and an audit
        entry per tool call."""
        tenant, attempt, delivery = body["tenant"], body["attempt"], body["delivery"]
        at = datetime.fromtimestamp(_int(body.get("finished_us")) / 1e6, UTC) if body.get("finished_us") else self.now
        usage = body.get("usage")
        if usage:
            self.event(tenant, run_id, workflow, "cost.recorded",
                       {"attempt": attempt, "cost_usd": _money(usage.get("cost_usd")),
                        "prompt_tokens": _int(usage.get("prompt_tokens")),
                        "completion_tokens": _int(usage.get("completion_tokens")),
                        "models": sorted({str(c.get("model", "?"))[:256] for c in usage.get("llm_calls") or ()
                                          if isinstance(c, dict)})}, step_id)  # fmt: skip
            self.usages.append(
                (tenant, run_id, step_id, attempt, delivery, body["worker"],
                 _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")),
                 str(_money(usage.get("cost_usd"))), orjson.dumps(usage).decode())
            )  # fmt: skip
            if self.governance:
                for ordinal, call in enumerate(usage.get("llm_calls") or ()):
                    if isinstance(call, dict):
                        self.ledger.append(
                            (tenant, workflow, run_id, step_id, attempt, delivery, "llm", ordinal, agent,
                             str(call.get("model", "?"))[:256], _int(call.get("prompt_tokens")),
                             _int(call.get("completion_tokens")), str(_money(call.get("cost_usd"))), at)
                        )  # fmt: skip
        for ordinal, call in enumerate(body.get("tool_calls") or ()):
            if not isinstance(call, dict):
                continue
            tool, cost, outcome = (
                str(call.get("tool", "?"))[:256],
                _money(call.get("cost_usd")),
                str(call.get("outcome", "?"))[:32],
            )
            input_hash, output_hash = _str_or_none(call.get("input_hash")), _str_or_none(call.get("output_hash"))
            started = datetime.fromtimestamp(_int(call.get("started_us")) / 1e6, UTC)
            self.tool_calls.append(
                (tenant, run_id, step_id, attempt, delivery, ordinal, tool, str(call.get("agent", ""))[:128],
                 input_hash, output_hash, float(_money(call.get("duration_ms"))), str(cost), outcome,
                 _str_or_none(call.get("error")), started)
            )  # fmt: skip
            if self.governance:
                self.ledger.append(
                    (tenant, workflow, run_id, step_id, attempt, delivery, "tool", ordinal, agent, tool, 0, 0,
                     str(cost), started)
                )  # fmt: skip
                self.audit(
                    tenant, "tool.called", f"tool:{tool}",
                    {"run": str(run_id), "step": str(step_id), "attempt": attempt, "tool": tool,
                     "input_hash": _hash_or_none(input_hash), "output_hash": _hash_or_none(output_hash),
                     "cost_usd": _decimal_text(cost), "outcome": outcome},
                    actor=f"worker:{body['worker']}",
                )  # fmt: skip

    def settle(self, run_id: uuid.UUID, step_id: uuid.UUID, body: dict[str, Any], *, workflow: str, agent: str) -> None:
        """For every recorded result. Budgets: release the attempt's reservation, count its spend. Calibration: note
        what a successful attempt used, when the primary model made every call."""
        usage = body.get("usage") or {}
        if self.budgets is None and not usage:
            return  # the engine's common case: nothing to settle or learn from
        calls = [c for c in usage.get("llm_calls") or () if isinstance(c, dict)]
        cost = _money(usage.get("cost_usd"))
        tokens = _int(usage.get("prompt_tokens")) + _int(usage.get("completion_tokens"))
        if self.budgets is not None:
            self.budgets.settle(tenant=body["tenant"], run_id=run_id, workflow=workflow, agent=agent,
                                step_id=step_id, attempt=body["attempt"], spent_usd=usd(cost),
                                spent_tokens=tokens)  # fmt: skip
        if calls and body["status"] == "succeeded" and self.governance:
            models = {str(c.get("model")) for c in calls}
            self.observations.append(
                (step_id, body["attempt"], models.pop() if len(models) == 1 else "", _int(usage.get("prompt_tokens")),
                 _int(usage.get("completion_tokens")), str(usd(cost)))
            )  # fmt: skip

    def dispatch_attempt(
        self,
        *,
        tenant: str,
        run_id: uuid.UUID,
        step_id: uuid.UUID,
        queue: str,
        body: dict[str, Any],
        workflow: str | None,
        name: str,
        trace: str | None = None,
    ) -> str:
        """Seal a step envelope for an attempt and queue it for publishing. Returns its hash.
        ``trace``: the run's stored trace context (``runs.traceparent``)."""
        wire, digest = seal(body)
        attempt = body["attempt"]
        self.event(tenant, run_id, workflow, "step.scheduled",
                   {"name": name, "agent": body["agent"]["name"], "seq": body["seq"], "attempt": attempt,
                    "queue": queue}, step_id)  # fmt: skip
        self.add_envelope(tenant, run_id, step_id, attempt, "step", digest, wire)
        self.audit(
            tenant, "step.dispatched", f"step:{step_id}",
            {"run": str(run_id), "step": str(step_id), "seq": body["seq"], "attempt": attempt,
             "agent": body["agent"]["name"], "queue": queue, "envelope_hash": digest},
        )  # fmt: skip
        if otel.ON:
            traceparent = dispatch_traceparent(tenant=tenant, workflow=workflow, run_id=run_id, step_id=step_id,
                                               body=body, queue=queue, trace=trace)  # fmt: skip
        else:
            traceparent = traceparent_for(run_id, trace)
        self.outbox.append(
            OutMsg(
                tenant=tenant,
                run_id=run_id,
                subject=self.names.step_subject(queue, tenant),
                msg_id=f"s:{step_id}:{attempt}",
                body=wire,
                traceparent=traceparent,
            )
        )
        return digest

    def new_step(
        self, spec: WorkflowSpec, tenant: str, run_id: uuid.UUID, req: StepRequest, trace: str | None = None
    ) -> None:
        agent = spec.agents[req.agent] if req.inline_agent is None else inline_agent(req.inline_agent)
        step_id = step_id_for(run_id, req.seq)
        agent_call: dict[str, Any] = {
            "name": req.agent,
            "type": agent.type,
            "config": agent.config,
            "timeout_s": agent.timeout_s,
        }
        tools = workflow_tools_of(spec, agent.type, agent.config)
        if tools:
            agent_call["tools"] = tools
        body = {
            "v": ENVELOPE_VERSION,
            "kind": "step",
            "tenant": tenant,
            "run": str(run_id),
            "step": str(step_id),
            "seq": req.seq,
            "attempt": 1,
            "agent": agent_call,
            "payload": req.payload,
        }
        limits = self.limits.pop(step_id, None)
        if limits is not None:
            body["budget"] = limits
        digest = self.dispatch_attempt(tenant=tenant, run_id=run_id, step_id=step_id, queue=agent.queue, body=body,
                                       workflow=spec.name, name=req.state, trace=trace)  # fmt: skip
        self.new_steps.append(
            (
                step_id,
                tenant,
                run_id,
                req.seq,
                req.state,
                req.agent,
                agent.queue,
                agent.retry.max_attempts,
                digest,
            )
        )

    #: A run to create with everything else; when its insert is skipped (idempotency
    #: key taken), nothing else of this write set is written either.
    new_run: tuple[Any, ...] | None = None

    async def flush(self, conn: asyncpg.Connection) -> bool:
        """Write everything collected in ONE statement (data-modifying CTEs).

        One statement is atomic on its own, so callers that have nothing else to do in
        the transaction need no BEGIN/COMMIT round trips. Fills in the outbox row ids.
        Returns False when ``new_run`` was not inserted (and so nothing was written).
        """
        params: list[Any] = []

        def arg(value: Any, cast: str) -> str:
            params.append(value)
            return f"${len(params)}::{cast}"

        def columns(rows: list[tuple[Any, ...]], casts: tuple[str, ...]) -> str:
            cols = list(zip(*rows, strict=True))
            return ", ".join(arg(list(col), cast) for col, cast in zip(cols, casts, strict=True))

        guard = " WHERE EXISTS (SELECT 1 FROM new_run)" if self.new_run is not None else ""
        ctes: list[str] = []
        if self.new_run is not None:
            ctes.append(
                "new_run AS (INSERT INTO runs (id, tenant_id, workflow_name, workflow_version, status, input, output,"
                " error, planner_state, idempotency_key, request_hash, created_at, finished_at, wake_at, estimate,"
                " traceparent)"
                " VALUES ("
                + ", ".join(arg(v, c) for v, c in zip(self.new_run, RUN_CASTS, strict=True))
                + ") ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
                " RETURNING id)"
            )
        if self.new_steps:
            ctes.append(
                "new_steps AS (INSERT INTO steps (id, tenant_id, run_id, seq, state, agent, queue, max_attempts,"
                " step_hash, status, attempt, attempts, pickups_before, queued_at) "
                f"SELECT u.*, 'queued', 1, 0, 0, {arg(self.now, 'timestamptz')} FROM unnest("
                + columns(
                    self.new_steps,
                    (
                        "uuid[]",
                        "text[]",
                        "uuid[]",
                        "int[]",
                        "text[]",
                        "text[]",
                        "text[]",
                        "int[]",
                        "text[]",
                    ),
                )
                + f") AS u{guard})"
            )
        if self.step_updates:
            ctes.append(
                "step_updates AS (UPDATE steps AS s SET status = u.status, attempt = u.attempt,"
                " attempts = u.attempts, pickups_before = u.pickups_before, worker = u.worker,"
                " started_at = u.started_at, finished_at = u.finished_at, next_attempt_at = u.next_attempt_at,"
                " output = u.output::jsonb, error = u.error, step_hash = u.step_hash,"
                " result_hash = u.result_hash, queued_at = u.queued_at FROM unnest("
                + columns(
                    self.step_updates,
                    (
                        "uuid[]",
                        "text[]",
                        "int[]",
                        "int[]",
                        "int[]",
                        "text[]",
                        "timestamptz[]",
                        "timestamptz[]",
                        "timestamptz[]",
                        "text[]",
                        "text[]",
                        "text[]",
                        "text[]",
                        "timestamptz[]",
                    ),
                )
                + ") AS u(id, status, attempt, attempts, pickups_before, worker, started_at, finished_at,"
                " next_attempt_at, output, error, step_hash, result_hash, queued_at) WHERE s.id = u.id)"
            )
        if self.run_updates:
            rows = [(run_id, *values) for run_id, values in self.run_updates.items()]
            ctes.append(
                "run_updates AS (UPDATE runs AS r SET status = u.status, planner_state = u.state::jsonb,"
                " output = u.output::jsonb, error = u.error, started_at = u.started_at,"
                " finished_at = u.finished_at, wake_at = u.wake_at FROM unnest("
                + columns(
                    rows,
                    (
                        "uuid[]",
                        "text[]",
                        "text[]",
                        "text[]",
                        "text[]",
                        "timestamptz[]",
                        "timestamptz[]",
                        "timestamptz[]",
                    ),
                )
                + ") AS u(id, status, state, output, error, started_at, finished_at, wake_at) WHERE r.id = u.id)"
            )
        # Rows this statement also updates (step_updates) are excluded from halting: a row
        # may be changed only once per statement; those were halted in memory.
        for cte, column, ids in (("halted", "id", self.cancel_steps), ("halted_runs", "run_id", self.halt_runs)):
            if ids:
                ctes.append(
                    f"{cte} AS (UPDATE steps SET status = 'cancelled', finished_at = "
                    + arg(self.now, "timestamptz")
                    + f", next_attempt_at = NULL WHERE {column} = ANY("
                    + arg(ids, "uuid[]")
                    + ") AND status IN ('queued', 'running') AND id <> ALL("
                    + arg([u[0] for u in self.step_updates], "uuid[]")
                    + ") RETURNING id, run_id, tenant_id, state, agent, attempt)"
                )
                ctes.append(
                    f"{cte}_events AS (INSERT INTO event_queue (tenant_id, run_id, workflow, step_id, type, data,"
                    " created_at) SELECT h.tenant_id, h.run_id, r.workflow_name, h.id, 'step.cancelled',"
                    " jsonb_build_object('name', h.state, 'agent', h.agent, 'attempt', h.attempt), "
                    + arg(self.now, "timestamptz")
                    + f" FROM {cte} h JOIN runs r ON r.id = h.run_id)"
                )
        book = self.budgets
        if book is not None:
            window_rows = book.window_rows()
            if window_rows:
                ctes.append(
                    "budget_windows_set AS (UPDATE budget_windows AS w SET spent_usd = u.spent_usd,"
                    " spent_tokens = u.spent_tokens, reserved_usd = u.reserved_usd,"
                    " reserved_tokens = u.reserved_tokens, warned = u.warned FROM unnest("
                    + columns(window_rows, WINDOW_CASTS)
                    + ') AS u(tenant_id, budget, "window", spent_usd, spent_tokens, reserved_usd, reserved_tokens,'
                    ' warned) WHERE w.tenant_id = u.tenant_id AND w.budget = u.budget AND w."window" = u."window"'
                    + guard.replace(" WHERE", " AND")
                    + ")"
                )
            if book.released:
                ctes.append(
                    "budget_released AS (DELETE FROM budget_reservations AS r USING unnest("
                    + arg([k[0] for k in book.released], "uuid[]")
                    + ", "
                    + arg([k[1] for k in book.released], "int[]")
                    + ") AS u(step_id, attempt) WHERE r.step_id = u.step_id AND r.attempt = u.attempt)"
                )
            reservation_rows = book.reservation_rows()
            if reservation_rows:
                ctes.append(
                    "budget_reserved AS (INSERT INTO budget_reservations (step_id, attempt, tenant_id, budget,"
                    ' "window", usd, tokens, run_id) SELECT * FROM unnest('
                    + columns(reservation_rows, RESERVATION_CASTS)
                    + f") AS u{guard} ON CONFLICT DO NOTHING)"
                )
        if self.step_estimates:
            ctes.append(
                "new_estimates AS (INSERT INTO step_estimates (step_id, attempt, tenant_id, run_id, agent, route,"
                " raw_prompt_tokens, raw_completion_tokens, est_tokens, est_cost_usd, created_at) SELECT * FROM unnest("
                + columns(self.step_estimates, ESTIMATE_CASTS)
                + f") AS u{guard} ON CONFLICT DO NOTHING)"
            )
        if self.observations:
            ctes.append(
                "observed AS (UPDATE step_estimates AS e SET actual_prompt_tokens = u.prompt,"
                " actual_completion_tokens = u.completion, actual_cost_usd = u.cost, observed_at = "
                + arg(self.now, "timestamptz")
                + " FROM unnest("
                + columns(self.observations, OBSERVATION_CASTS)
                + ") AS u(step_id, attempt, models, prompt, completion, cost) WHERE e.step_id = u.step_id"
                " AND e.attempt = u.attempt AND e.route = u.models AND e.observed_at IS NULL)"
            )
        if self.usages:
            ctes.append(
                "new_usage AS (INSERT INTO step_usage (tenant_id, run_id, step_id, attempt, delivery, worker,"
                " prompt_tokens, completion_tokens, cost_usd, detail) SELECT * FROM unnest("
                + columns(self.usages, USAGE_CASTS)
                + ") ON CONFLICT DO NOTHING)"
            )
        if self.tool_calls:
            ctes.append(
                "new_tool_calls AS (INSERT INTO tool_calls (tenant_id, run_id, step_id, attempt, delivery, ordinal,"
                " tool, agent, input_hash, output_hash, duration_ms, cost_usd, outcome, error, started_at)"
                " SELECT * FROM unnest(" + columns(self.tool_calls, TOOL_CALL_CASTS) + ") ON CONFLICT DO NOTHING)"
            )
        if self.ledger:
            ctes.append(
                "new_ledger AS (INSERT INTO cost_ledger (tenant_id, workflow, run_id, step_id, attempt, delivery, kind,"
                " ordinal, agent, name, prompt_tokens, completion_tokens, cost_usd, at) SELECT * FROM unnest("
                + columns(self.ledger, LEDGER_CASTS)
                + ") ON CONFLICT DO NOTHING)"
            )
        if self.audits:
            ctes.append(
                f"new_audits AS (INSERT INTO audit_queue ({audit_store.QUEUE_COLUMNS}) SELECT * FROM unnest("
                + columns(self.audits, audit_store.QUEUE_CASTS)
                + f") AS u{guard})"
            )
        if self.events:
            ctes.append(
                "new_events AS (INSERT INTO event_queue (tenant_id, run_id, workflow, step_id, type, data, created_at)"
                " SELECT * FROM unnest(" + columns(self.events, EVENT_CASTS) + f") AS u{guard})"
            )
        if self.envelopes:
            ctes.append(
                "new_envelopes AS (INSERT INTO envelopes (tenant_id, run_id, step_id, attempt, kind, hash, body) "
                "SELECT * FROM unnest("
                + columns(self.envelopes, ENVELOPE_CASTS)
                + f") AS u{guard} ON CONFLICT (step_id, attempt, kind) WHERE kind IN ('step', 'result') DO NOTHING)"
            )
        if self.outbox:
            ctes.append(
                "new_outbox AS (INSERT INTO outbox (tenant_id, run_id, subject, msg_id, body, traceparent,"
                " created_at) SELECT u.*, "
                + arg(self.now, "timestamptz")
                + " FROM unnest("
                + columns(
                    [(m.tenant, m.run_id, m.subject, m.msg_id, m.body, m.traceparent) for m in self.outbox],
                    ("text[]", "uuid[]", "text[]", "text[]", "bytea[]", "text[]"),
                )
                + f") AS u{guard} RETURNING id)"
            )
        if not ctes:
            return True
        inserted = "(SELECT count(*) FROM new_run)" if self.new_run is not None else "1"
        outbox_ids = "ARRAY(SELECT id FROM new_outbox ORDER BY id)" if self.outbox else "NULL::bigint[]"
        row = await conn.fetchrow("WITH " + ", ".join(ctes) + f" SELECT {inserted}, {outbox_ids}", *params)
        assert row is not None
        if self.events or self.cancel_steps or self.halt_runs:
            EVENTS_QUEUED.set()
        if self.outbox and row[0]:
            # Serial ids follow the unnest order, so ids and messages pair up in order.
            for msg, outbox_id in zip(self.outbox, row[1], strict=True):
                msg.outbox_id = outbox_id
        return bool(row[0])


USAGE_CASTS = ("text[]", "uuid[]", "uuid[]", "int[]", "int[]", "text[]", "bigint[]", "bigint[]", "numeric[]",
               "jsonb[]")  # fmt: skip
TOOL_CALL_CASTS = ("text[]", "uuid[]", "uuid[]", "int[]", "int[]", "int[]", "text[]", "text[]", "text[]", "text[]",
                   "float8[]", "numeric[]", "text[]", "text[]", "timestamptz[]")  # fmt: skip


ESTIMATE_CASTS = ("uuid[]", "int[]", "text[]", "uuid[]", "text[]", "text[]", "bigint[]", "bigint[]", "bigint[]",
                  "numeric[]", "timestamptz[]")  # fmt: skip
OBSERVATION_CASTS = ("uuid[]", "int[]", "text[]", "bigint[]", "bigint[]", "numeric[]")
#: reservations are the estimate's worst case plus this margin: the worker counts the prompt
#: itself (tool declarations included, which the estimate leaves out) and refuses a call
#: that could pass its reservation
RESERVATION_HEADROOM = 1.2

LEDGER_CASTS = ("text[]", "text[]", "uuid[]", "uuid[]", "int[]", "int[]", "text[]", "int[]", "text[]", "text[]",
                "bigint[]", "bigint[]", "numeric[]", "timestamptz[]")  # fmt: skip


def _decimal_text(value: float) -> str:
    """Dollars as exact decimal text in audit data (floats are not hashed)."""
    return f"{value:.10f}".rstrip("0").rstrip(".") or "0"


def clean_text(value: str, limit: int = 500) -> str:
    """Free text for an audit entry: bounded, and without the NUL Postgres refuses."""
    return value.replace("\x00", "\ufffd")[:limit]


def _hash_or_none(value: str | None) -> str | None:
    return value if value is not None and value.startswith("sha256:") and len(value) <= 80 else None


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _money(value: Any) -> float:
    # Workers are trusted but their numbers are still data: never let a bad one fail a batch.
    return float(value) if type(value) in (int, float) and value >= 0 else 0.0


def _str_or_none(value: Any) -> str | None:
    return value[:4000] if isinstance(value, str) else None


EVENT_CASTS = ("text[]", "uuid[]", "text[]", "uuid[]", "text[]", "jsonb[]", "timestamptz[]")
ENVELOPE_CASTS = ("text[]", "uuid[]", "uuid[]", "int[]", "text[]", "text[]", "bytea[]")
RUN_CASTS = ("uuid", "text", "text", "int", "text", "jsonb", "jsonb", "text", "jsonb", "text", "text",
             "timestamptz", "timestamptz", "timestamptz", "jsonb", "text")  # fmt: skip


def dumps_or_none(value: Any) -> str | None:
    """JSON text for a jsonb column; Python None stays SQL NULL."""
    return None if value is None else orjson.dumps(value).decode()
