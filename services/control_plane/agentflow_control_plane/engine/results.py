"""Consuming result envelopes in batches and advancing runs, one transaction per batch.

Per batch: verify every envelope's hash and shape, lock the affected runs (in id order,
so concurrent control planes never deadlock), record results idempotently (a step
attempt completes at most once), apply retry policies, feed final step results to the
planner, write the next steps to the outbox, commit, then publish and ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.connection import ensure_consumer
from agentflow_bus.pull import PullConsumer
from agentflow_bus.subjects import Names
from agentflow_bus.tasks import stop_task
from agentflow_control_plane import metrics
from agentflow_control_plane.db.session import pg_transaction
from agentflow_control_plane.engine.decisions import apply_decision, now_ms, publish_cancels, stop_for_budget
from agentflow_control_plane.engine.dispatcher import Dispatcher
from agentflow_control_plane.engine.rows import ACTIVE, FINAL_RUN, RunRow, StepRow
from agentflow_control_plane.engine.specs import CompiledWorkflow, SpecCache
from agentflow_control_plane.engine.writes import WriteSet, clean_text
from agentflow_control_plane.governance.costing import CostServices
from agentflow_control_plane.settings import ControlPlaneSettings
from agentflow_control_plane.tracing import traced_result
from agentflow_core.envelope import check_result, open_envelope
from agentflow_core.errors import EnvelopeRejected
from agentflow_core.planners import StepResult
from agentflow_core.spec import INLINE_RETRY

log = logging.getLogger("agentflow.results")


def _duration_ms(step: StepRow, now: datetime) -> float | None:
    start = step.started_at or step.queued_at
    end = step.finished_at or now
    return round((end - start).total_seconds() * 1000, 3) if start is not None else None


def _tokens(usage: dict[str, Any]) -> int:
    total = 0
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key)
        if type(value) is int and value > 0:
            total += value
    return total


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


@dataclass(slots=True)
class Incoming:
    msg: Msg
    body: dict[str, Any] | None  # None: rejected on receipt
    raw: bytes
    digest: str
    step_id: uuid.UUID | None
    reject_reason: str | None = None


# Steps are locked with their runs (runs first, everywhere): after waiting for a lock,
# Postgres re-reads only the rows it locked, so an unlocked step row could be stale (a
# step another batch just halted would come back "running").
LOAD_SQL = (
    "SELECT s.id, s.run_id, s.tenant_id, s.seq, s.state, s.agent, s.status, s.attempt, s.max_attempts,"
    " s.attempts, s.pickups_before, s.step_hash, s.queued_at, s.started_at, s.worker,"
    " r.status, r.planner_state, r.input, r.workflow_name, r.workflow_version, r.started_at,"
    " EXISTS (SELECT 1 FROM envelopes e WHERE e.step_id = s.id AND e.attempt = s.attempt"
    " AND e.kind = 'result'), r.wake_at, r.traceparent "
    "FROM steps s JOIN runs r ON r.id = s.run_id WHERE s.id = ANY($1::uuid[]) "
    "ORDER BY r.id, s.id FOR UPDATE OF r, s"
)


class ResultProcessor:
    def __init__(
        self,
        nc: Client,
        engine: AsyncEngine,
        dispatcher: Dispatcher,
        specs: SpecCache,
        settings: ControlPlaneSettings,
        *,
        costs: CostServices | None = None,
    ) -> None:
        self._costs = costs
        self._nc = nc
        self._engine = engine
        self._dispatcher = dispatcher
        self._specs = specs
        self._settings = settings
        self._names = Names(settings.nats_prefix)
        self._pending: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._consumer: PullConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._backoff = 0.1

    async def start(self) -> None:
        js = self._nc.jetstream()
        await ensure_consumer(
            js,
            stream=self._names.results_stream,
            durable=self._names.results_consumer,
            filter_subject=self._names.results_filter,
            ack_wait=30.0,
            max_deliver=-1,
        )
        self._consumer = PullConsumer(
            self._nc,
            stream=self._names.results_stream,
            durable=self._names.results_consumer,
            on_message=self._enqueue,
            max_inflight=self._settings.result_batch_max * 2,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._loop(), name="results")

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        await stop_task(self._task)
        if self._running:
            # Let batches in flight commit (or fail and be redelivered) before leaving.
            await asyncio.wait(self._running, timeout=10)

    def _enqueue(self, msg: Msg) -> None:
        self._pending.append(msg)
        self._wake.set()

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self._settings.results_concurrency)
        running = self._running
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await slots.acquire()
                n = min(len(self._pending), self._settings.result_batch_max)
                if n == 0:
                    slots.release()
                    break
                batch = [self._pending.popleft() for _ in range(n)]
                task = asyncio.create_task(self._process_guarded(batch, slots))
                running.add(task)
                task.add_done_callback(running.discard)

    async def _process_guarded(self, batch: list[Msg], slots: asyncio.Semaphore) -> None:
        try:
            await self.process(batch)
            self._backoff = 0.1
        except Exception as exc:
            log.warning("result batch of %d failed (%s); redelivering", len(batch), exc, exc_info=True)
            for msg in batch:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self._backoff)
            assert self._consumer is not None
            self._consumer.done(len(batch))
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)
        finally:
            slots.release()

    @staticmethod
    def _parse(msg: Msg) -> Incoming:
        raw = msg.data
        try:
            body, digest = open_envelope(raw)
            check_result(body)
            return Incoming(msg, body, raw, digest, uuid.UUID(body["step"]))
        except (EnvelopeRejected, ValueError) as exc:
            reason = exc.message if isinstance(exc, EnvelopeRejected) else f"malformed envelope: {exc}"
            step_id = None
            with contextlib.suppress(Exception):
                step_id = uuid.UUID(orjson.loads(raw)["step"])
            return Incoming(msg, None, raw, "", step_id, reason)

    async def process(self, msgs: list[Msg]) -> None:
        incoming = [self._parse(m) for m in msgs]
        now = datetime.now(UTC)
        writes = WriteSet(self._names, now, governance=self._settings.governance_enabled)
        latencies: list[float] = []
        step_ids = list({i.step_id for i in incoming if i.step_id is not None})
        async with pg_transaction(self._engine) as conn:
            rows = await conn.fetch(LOAD_SQL, step_ids) if step_ids else []
            steps = {r[0]: StepRow(r) for r in rows}
            runs: dict[uuid.UUID, RunRow] = {}
            for r in rows:
                if r[1] not in runs:
                    runs[r[1]] = RunRow.from_load(r)
            compiled = await self._specs.get_many(conn, {run.key for run in runs.values()})
            loaded: dict[uuid.UUID, list[StepRow]] = {}
            for row in steps.values():
                loaded.setdefault(row.run_id, []).append(row)
            if self._costs is not None:
                spending = {
                    step.run_id
                    for item in incoming
                    if item.body is not None and ("usage" in item.body or "tool_calls" in item.body)
                    and item.step_id is not None and (step := steps.get(item.step_id)) is not None
                }  # fmt: skip
                await self._costs.prepare(conn, writes, runs.values(), compiled, spending)

            # Holding the run locks, a result already recorded for a step's current
            # attempt is visible (has_result): every writer of result envelopes takes
            # the same locks first. Duplicates inside one batch are caught by `seen`.
            seen: set[tuple[uuid.UUID, int]] = set()
            for item in incoming:
                step = steps.get(item.step_id) if item.step_id else None
                if step is None:
                    reason = item.reject_reason or "result for an unknown step"
                    metrics.RESULTS_REJECTED.labels("unknown_step" if item.body else "invalid").inc()
                    log.warning("dropping result message: %s", reason)
                    continue
                run = runs[step.run_id]
                body = item.body
                if body is not None:
                    if body["tenant"] != step.tenant or body["run"] != str(step.run_id):
                        body = None
                        item.reject_reason = "result names another tenant or run than its step"
                    elif body["kind"] == "started":
                        self._started(step, run, body, writes)  # progress only: no envelope to keep
                        continue
                    elif body["attempt"] == step.attempt and step.step_hash and body["step_hash"] != step.step_hash:
                        item.reject_reason = (
                            f"result answers step envelope {body['step_hash']}, "
                            f"but attempt {step.attempt} was dispatched as {step.step_hash}"
                        )
                        body = None
                    item.body = body
                if body is None:
                    metrics.RESULTS_REJECTED.labels("verification").inc()
                    attempt = step.attempt
                    with contextlib.suppress(Exception):
                        attempt = int(orjson.loads(item.raw)["attempt"])
                    digest = item.digest or "sha256:unverified"
                    writes.add_envelope(step.tenant, step.run_id, step.id, attempt, "rejected", digest, item.raw)
                    if writes.budgets is not None:  # nothing trustworthy was reported: release only
                        writes.budgets.settle(tenant=step.tenant, run_id=step.run_id, workflow=run.key[1],
                                              agent=step.agent, step_id=step.id, attempt=attempt,
                                              spent_usd=Decimal(0), spent_tokens=0)  # fmt: skip
                    writes.audit(
                        step.tenant, "step.rejected", f"step:{step.id}",
                        {"run": str(step.run_id), "step": str(step.id), "attempt": attempt, "envelope_hash": digest,
                         "reason": clean_text(item.reject_reason or "")},
                    )  # fmt: skip
                    # A result that failed verification counts as a failed attempt.
                    if attempt == step.attempt and step.status in ACTIVE and run.status not in FINAL_RUN:
                        self._finish_attempt(
                            step, run, compiled.get(run.key), writes, now,
                            StepResult(step.seq, "rejected", None, f"result rejected: {item.reject_reason}"), loaded,
                        )  # fmt: skip
                    continue
                key = (step.id, body["attempt"])
                if key in seen:
                    continue  # the same result twice in this batch
                seen.add(key)
                current = body["attempt"] == step.attempt
                if current and step.has_result:
                    continue  # duplicate delivery of a result already recorded
                writes.add_envelope(
                    step.tenant,
                    step.run_id,
                    step.id,
                    body["attempt"],
                    "result",
                    item.digest,
                    item.raw,
                )
                if "usage" in body or "tool_calls" in body:
                    writes.add_spend(step.run_id, step.id, body, workflow=run.key[1], agent=step.agent)
                writes.settle(step.run_id, step.id, body, workflow=run.key[1], agent=step.agent)
                writes.audit(
                    step.tenant, "step.completed" if body["status"] == "succeeded" else "step.failed",
                    f"step:{step.id}",
                    {"run": str(step.run_id), "step": str(step.id), "attempt": body["attempt"],
                     "status": body["status"], "result_hash": item.digest, "step_hash": body["step_hash"]},
                    actor=f"worker:{body['worker']}",
                )  # fmt: skip
                if not current or step.status not in ACTIVE or run.status in FINAL_RUN:
                    continue  # late result of a superseded attempt or a finished run: recorded only
                step.has_result = True
                self._started(step, run, body, writes)
                step.finished_at = _ts(body["finished_us"])
                step.result_hash = item.digest
                latencies.append((now - step.queued_at).total_seconds())
                result = StepResult(step.seq, body["status"], body.get("output"), body.get("error"))
                self._finish_attempt(step, run, compiled.get(run.key), writes, now, result, loaded, body.get("usage"))

            for step in steps.values():
                if step.dirty:
                    writes.step_updates.append(step.update_tuple())
            for run in runs.values():
                if run.dirty:
                    writes.run_updates[run.id] = run.update_tuple()
            await writes.flush(conn)
        outgoing = writes.outbox

        # Next steps go out first; acks are fire-and-forget writes; then wait for the
        # stream to confirm the steps.
        sent = await self._dispatcher.send(outgoing)
        if writes.cancel_notices:
            await publish_cancels(self._nc, self._names, writes.cancel_notices)
        for item in incoming:
            # Verified messages are acked; refused ones are terminated so they never return.
            await (item.msg.ack() if item.body is not None else item.msg.term())
        assert self._consumer is not None
        self._consumer.done(len(incoming))
        metrics.RESULTS_BATCH.observe(len(incoming))
        if writes.ledger:
            metrics.record_spend(writes.ledger)
        for latency in latencies:
            metrics.STEP_LATENCY.observe(latency)
        await self._dispatcher.confirm(outgoing, sent)

    @staticmethod
    def _started(step: StepRow, run: RunRow, body: dict[str, Any], writes: WriteSet) -> None:
        if body["attempt"] != step.attempt or step.status not in ACTIVE:
            return
        if step.status != "running" or step.worker != body["worker"]:
            writes.event(step.tenant, run.id, run.key[1], "step.started",
                         {"name": step.state, "agent": step.agent, "attempt": step.attempt, "worker": body["worker"]},
                         step.id)  # fmt: skip
        step.status = "running"
        step.worker = body["worker"]
        step.started_at = _ts(body["started_us"])
        step.attempts = max(step.attempts, step.pickups_before + body["delivery"])
        step.dirty = True
        if run.status == "pending":
            run.status = "running"
            run.started_at = run.started_at or step.started_at
            run.dirty = True
            writes.event(step.tenant, run.id, run.key[1], "run.started", {"status": "running"})

    @traced_result
    def _finish_attempt(
        self,
        step: StepRow,
        run: RunRow,
        workflow: CompiledWorkflow | None,
        writes: WriteSet,
        now: datetime,
        result: StepResult,
        loaded: dict[uuid.UUID, list[StepRow]],
        usage: Any = None,
    ) -> None:
        step.dirty = True
        data: dict[str, Any] = {"name": step.state, "agent": step.agent, "attempt": step.attempt,
                                "worker": step.worker, "duration_ms": _duration_ms(step, now)}  # fmt: skip
        if isinstance(usage, dict):
            data["cost_usd"] = usage.get("cost_usd", 0)
            data["tokens"] = _tokens(usage)
        if result.status == "succeeded":
            step.status = "succeeded"
            step.output = result.output
            step.error = None
            metrics.STEPS_COMPLETED.inc()
            writes.event(step.tenant, run.id, run.key[1], "step.succeeded", data, step.id)
        else:
            metrics.STEPS_FAILED.labels(result.status).inc()
            step.error = result.error or result.status
            step.output = result.output
            data |= {"status": result.status, "error": clean_text(step.error, 2000)}
            if workflow is not None and step.attempt < step.max_attempts:
                refusal = writes.reserve_retry(step.tenant, run.id, run.key[1], step.agent, step.id, step.attempt + 1)
                if refusal is not None:
                    step.status = "failed"
                    writes.event(step.tenant, run.id, run.key[1], "step.failed", {**data, "retrying": False}, step.id)
                    stop_for_budget(run, refusal, tenant=step.tenant, writes=writes, now=now, loaded=loaded)
                    return
                agent = workflow.spec.agents.get(step.agent)
                policy = agent.retry if agent is not None else INLINE_RETRY
                delay_ms = policy.delay_ms(step.attempt)
                writes.event(step.tenant, run.id, run.key[1], "step.failed",
                             {**data, "retrying": True, "retry_in_ms": delay_ms}, step.id)  # fmt: skip
                step.status = "queued"
                step.attempt += 1
                step.pickups_before = max(step.attempts, step.pickups_before + 1)
                step.attempts = step.pickups_before
                step.next_attempt_at = now + timedelta(milliseconds=delay_ms)
                step.step_hash = None
                step.finished_at = None
                metrics.STEP_RETRIES.inc()
                return
            step.status = "failed"
            writes.event(step.tenant, run.id, run.key[1], "step.failed", {**data, "retrying": False}, step.id)
        if workflow is None:
            return
        decision = workflow.planner.on_result(run.state, result, run.input, now_ms(now))
        apply_decision(decision, run=run, spec=workflow.spec, tenant=step.tenant, writes=writes, now=now, loaded=loaded)
