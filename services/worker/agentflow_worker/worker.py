"""The worker process: pull step envelopes, verify, run the agent, publish the result, ack.

Order matters for durability: the result is published (and acknowledged by JetStream)
*before* the step message is acked, so a crash at any point leaves the step to be
redelivered, never lost. While a step runs, the worker sends in-progress heartbeats every
third of the ack wait, so JetStream only redelivers steps whose worker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agentflow_bus import tracing as otel
from agentflow_bus.connection import connect, ensure_consumer, ensure_streams
from agentflow_bus.kv import ensure_bucket
from agentflow_bus.pull import PullConsumer
from agentflow_bus.subjects import Names
from agentflow_core.envelope import ENVELOPE_VERSION, StepEnvelope, check_step, open_envelope, seal
from agentflow_core.errors import AgentFlowError, CanonicalizationError, EnvelopeRejected
from agentflow_worker import __version__, metrics
from agentflow_worker.agents.base import Agent, AgentError, BaseAgent, StepContext
from agentflow_worker.heartbeat import Heartbeat
from agentflow_worker.services import WorkerServices
from agentflow_worker.settings import WorkerSettings
from agentflow_worker.tracing import setup as setup_tracing
from agentflow_worker.tracing import step_outcome, traced_step

log = logging.getLogger("agentflow.worker")

PUBLISH_TIMEOUT_S = 5.0


def _now_us() -> int:
    return time.time_ns() // 1000


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        agents: dict[str, Agent] | None = None,
        services: WorkerServices | None = None,
    ) -> None:
        self.settings = settings
        self.names = Names(settings.nats_prefix)
        if agents is None:
            from agentflow_worker.agents.registry import all_agents

            agents = all_agents()
        self.agents = agents
        #: built in start() from the settings unless given (tests)
        self.services = services
        self._heartbeat: Heartbeat | None = None
        self._started_at = time.time()
        self.nc: Client | None = None
        # One JetStream context for the process: each context owns its own reply
        # subscription for async publishes, so creating one per message would leak them.
        self.js: JetStreamContext | None = None
        self._consumer: PullConsumer | None = None
        # task -> (run id, step id) of the step it executes ("" until known)
        self._tasks: dict[asyncio.Task[None], tuple[str, str]] = {}
        # Recently cancelled runs and halted steps: a message for one of them that
        # arrives after the notice is terminated unanswered.
        self._cancelled_runs: OrderedDict[str, None] = OrderedDict()
        self._cancelled_steps: OrderedDict[str, None] = OrderedDict()
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        setup_tracing()  # OTEL_* variables; off (no-op) unless an exporter is configured
        self.nc = await connect(s, name=f"agentflow-worker {s.worker_name}")
        js = self.js = self.nc.jetstream()
        await ensure_streams(js, s)
        await ensure_consumer(
            js,
            stream=self.names.steps_stream,
            durable=self.names.step_consumer(s.worker_queue),
            filter_subject=self.names.step_filter(s.worker_queue),
            ack_wait=s.step_ack_wait_s,
            max_deliver=s.step_max_deliver,
        )
        await self.nc.subscribe(self.names.cancel_subject, cb=self._on_cancel)
        if self.services is None:
            from agentflow_worker.wiring import build_services

            self.services = await build_services(s, self.nc, js, self.names)
        for agent in self.agents.values():
            if isinstance(agent, BaseAgent):
                await agent.setup()
        kv = await ensure_bucket(js, self.names.workers_bucket, ttl_s=max(60.0, s.worker_heartbeat_s * 6),
                                 replicas=s.stream_replicas)  # fmt: skip
        self._heartbeat = Heartbeat(kv, s.worker_name.replace(" ", "_"), s.worker_heartbeat_s, self.describe)
        await self._heartbeat.start()
        self._consumer = PullConsumer(
            self.nc,
            stream=self.names.steps_stream,
            durable=self.names.step_consumer(s.worker_queue),
            on_message=self._on_message,
            max_inflight=s.worker_concurrency,
        )
        await self._consumer.start()
        metrics.CONCURRENCY.labels(s.worker_queue).set(s.worker_concurrency)
        log.info("worker %s consuming queue '%s' (concurrency %d)", s.worker_name, s.worker_queue,
                 s.worker_concurrency)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "id": s.worker_name,
            "version": __version__,
            "queues": [s.worker_queue],
            "concurrency": s.worker_concurrency,
            "in_flight": len(self._tasks),
            "agent_types": sorted(self.agents),
            "started_at": self._started_at,
        }

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking steps, let running ones finish (up to the timeout), then leave."""
        if drain_timeout_s is None:
            drain_timeout_s = self.settings.worker_drain_timeout_s
        self._stopping = True
        if self._consumer is not None:
            await self._consumer.stop()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=drain_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        for agent in self.agents.values():
            if isinstance(agent, BaseAgent):
                with contextlib.suppress(Exception):
                    await agent.close()
        if self.services is not None:
            with contextlib.suppress(Exception):
                await self.services.aclose()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)

    # --- messages ----------------------------------------------------------------------

    def _on_message(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._tasks[task] = ("", "")
        task.add_done_callback(self._tasks.pop)

    async def _on_cancel(self, msg: Msg) -> None:
        """``{"run": id}`` stops a whole run; ``{"run": id, "steps": [ids]}`` halts steps."""
        try:
            notice = orjson.loads(msg.data)
            run = str(notice["run"])
            steps = [str(s) for s in notice.get("steps") or ()]
        except Exception:
            return
        if steps:
            for step in steps:
                self._cancelled_steps[step] = None
            while len(self._cancelled_steps) > 50_000:
                self._cancelled_steps.popitem(last=False)
        else:
            self._cancelled_runs[run] = None
            while len(self._cancelled_runs) > 10_000:
                self._cancelled_runs.popitem(last=False)
        halted = set(steps)
        for task, (task_run, task_step) in list(self._tasks.items()):
            if task_run == run and (not halted or task_step in halted):
                task.cancel()

    async def _handle(self, msg: Msg) -> None:
        assert self._consumer is not None
        metrics.INFLIGHT.inc()
        try:
            try:
                body, digest = open_envelope(msg.data)
                step = check_step(body)
            except EnvelopeRejected as exc:
                await self._reject(msg, exc.message)
                return
            if step["run"] in self._cancelled_runs or step["step"] in self._cancelled_steps:
                await msg.term()
                return
            current = asyncio.current_task()
            if current is not None:
                self._tasks[current] = (step["run"], step["step"])
            try:
                await self._execute(msg, step, digest)
            except asyncio.CancelledError:
                # Run cancelled (or shutdown): the step is not answered; on shutdown
                # another worker gets it at once.
                with contextlib.suppress(Exception):
                    await (msg.nak() if self._stopping else msg.term())
        except Exception:
            log.exception("step handling failed; it will be redelivered")
        finally:
            metrics.INFLIGHT.dec()
            self._consumer.done()

    async def _reject(self, msg: Msg, reason: str) -> None:
        """Refuse a malformed or mis-hashed step: tell the control plane, terminate it."""
        metrics.REJECTED.labels("hash_mismatch" if "hash mismatch" in reason else "malformed").inc()
        log.warning("rejecting step message: %s", reason)
        try:
            claimed = orjson.loads(msg.data)
            ids = {k: claimed[k] for k in ("tenant", "run", "step", "attempt")}
            if not all(isinstance(ids[k], str) for k in ("tenant", "run", "step")) or type(ids["attempt"]) is not int:
                raise ValueError("ids of wrong type")
        except Exception:
            # Nothing identifies a step: all we can do is drop it (JetStream keeps an advisory).
            await msg.term()
            return
        claimed_hash = claimed.get("hash") if isinstance(claimed.get("hash"), str) else ""
        result = self._result_body(ids, claimed_hash, msg, "rejected", None, f"step envelope rejected: {reason}",
                                   _now_us())  # fmt: skip
        if await self._publish_result(ids["tenant"], result, msg):
            await msg.term()

    def _result_body(
        self,
        ids: dict[str, Any],
        step_hash: str,
        msg: Msg,
        status: str,
        output: Any,
        error: str | None,
        started_us: int,
    ) -> dict[str, Any]:
        return {
            "v": ENVELOPE_VERSION,
            "kind": "result",
            "tenant": ids["tenant"],
            "run": ids["run"],
            "step": ids["step"],
            "attempt": ids["attempt"],
            "step_hash": step_hash,
            "status": status,
            "output": output,
            "error": error,
            "worker": self.settings.worker_name,
            "delivery": msg.metadata.num_delivered or 1,
            "started_us": started_us,
            "finished_us": _now_us(),
        }

    @traced_step
    async def _execute(self, msg: Msg, step: StepEnvelope, digest: str) -> None:
        agent_call = step["agent"]
        agent_type = agent_call["type"]
        delivery = msg.metadata.num_delivered or 1
        started_us = _now_us()
        budget = step.get("budget", {})
        ctx = StepContext(
            tenant=step["tenant"],
            run=step["run"],
            step=step["step"],
            seq=step["seq"],
            attempt=step["attempt"],
            delivery=delivery,
            agent_name=agent_call["name"],
            config=agent_call["config"],
            payload=step["payload"],
            workflow_tools=agent_call.get("tools", []),
            services=self.services,
            budget_usd=float(budget["max_cost_usd"]) if "max_cost_usd" in budget else None,
            budget_tokens=budget.get("max_tokens"),
        )
        # Most steps finish before the notice is due: a timer is cheaper than a task.
        keepalive: list[asyncio.Task[None]] = []

        def start_keepalive() -> None:
            keepalive.append(asyncio.create_task(self._keepalive(msg, step, started_us, delivery)))

        notice_s = self.settings.worker_started_notice_ms / 1000
        timer = asyncio.get_running_loop().call_later(notice_s, start_keepalive)
        status, output, error = "succeeded", None, None
        began = time.perf_counter()
        try:
            agent = self.agents.get(agent_type)
            if agent is None:
                status, error = "failed", f"this worker has no agent of type '{agent_type}'"
            else:
                timeout = agent_call.get("timeout_s")
                hooks = agent if isinstance(agent, BaseAgent) else None
                failure: BaseException | None = None
                try:
                    async with asyncio.timeout(timeout):
                        if hooks is not None:
                            await hooks.on_start(ctx)
                        output = await agent.run(ctx)
                except TimeoutError as exc:
                    failure = exc
                    status, error = (
                        "timeout",
                        f"agent '{ctx.agent_name}' timed out after {timeout}s",
                    )
                except AgentError as exc:
                    failure = exc
                    status, error = "failed", str(exc) or type(exc).__name__
                except AgentFlowError as exc:
                    failure = exc
                    status, error = "failed", exc.message
                except Exception as exc:
                    failure = exc
                    log.exception("agent %s raised", ctx.agent_name)
                    status, error = "failed", f"{type(exc).__name__}: {exc}"
                if hooks is not None:
                    try:
                        await hooks.on_finish(ctx, output, failure)
                    except Exception:
                        log.exception("on_finish of agent %s raised", ctx.agent_name)
        finally:
            timer.cancel()
            for task in keepalive:
                task.cancel()
        metrics.DURATION.labels(agent_type).observe(time.perf_counter() - began)
        result = self._result_body(dict(step), digest, msg, status, output, error, started_us)
        usage = ctx.meter.summary()
        step_outcome(status, error, usage)
        if usage is not None:
            result["usage"] = usage
        if ctx.meter.tool_calls:
            result["tool_calls"] = ctx.meter.tool_calls
        if not await self._publish_result(step["tenant"], result, msg):
            return  # not acked: JetStream redelivers the step
        metrics.STEPS.labels(agent_type, result["status"]).inc()
        await msg.ack()

    async def _keepalive(self, msg: Msg, step: StepEnvelope, started_us: int, delivery: int) -> None:
        """Report a long step as started, and keep JetStream from redelivering it."""
        notice_s = self.settings.worker_started_notice_ms / 1000
        notice = {
            "v": ENVELOPE_VERSION,
            "kind": "started",
            "tenant": step["tenant"],
            "run": step["run"],
            "step": step["step"],
            "attempt": step["attempt"],
            "worker": self.settings.worker_name,
            "delivery": delivery,
            "started_us": started_us,
        }
        wire, _ = seal(notice)
        assert self.js is not None
        with contextlib.suppress(Exception):
            future = await self.js.publish_async(
                self.names.result_subject(step["tenant"]), wire, headers=self._headers(msg)
            )
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await future
        interval = max(self.settings.step_ack_wait_s / 3 - notice_s, 0.05)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()
            interval = self.settings.step_ack_wait_s / 3

    @staticmethod
    def _headers(msg: Msg) -> dict[str, str]:
        headers = {}
        # Inside a step: its span produced the result; else (a rejected message) the sender's.
        parent = otel.current_traceparent() or (msg.headers or {}).get("traceparent")
        if parent:
            headers["traceparent"] = parent
        return headers

    async def _publish_result(self, tenant: str, result: dict[str, Any], msg: Msg) -> bool:
        try:
            wire, _ = seal(result)
        except CanonicalizationError as exc:
            result["status"], result["output"] = "failed", None
            result["error"] = f"agent output cannot be canonicalized: {exc.message}"
            wire, _ = seal(result)
        headers = self._headers(msg)
        headers["Nats-Msg-Id"] = f"r:{result['step']}:{result['attempt']}:{result['delivery']}"
        js = self.js
        assert js is not None
        deadline = time.monotonic() + self.settings.step_ack_wait_s * 0.8
        delay = 0.1
        while True:
            try:
                future = await js.publish_async(self.names.result_subject(tenant), wire, headers=headers)
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await future
                return True
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    log.warning("giving up publishing result of step %s: %s", result["step"], exc)
                    return False
                log.warning("publishing result failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def run_worker(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set (SIGTERM/SIGINT), then drain: no new steps, running ones
    finish (up to ``worker_drain_timeout_s``), the rest go back to JetStream at once."""
    worker = Worker(settings)
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
    await worker.start()
    await stop.wait()
    await worker.stop()
