"""The control plane's spans (see docs/observability.md, "Tracing").

One trace per run. The HTTP request that creates a run holds ``agentflow.run.create``,
whose context is stored as ``runs.traceparent``; every later step of the run hangs off it:
``agentflow.result`` per processed step result, ``agentflow.decision`` per planner decision,
``agentflow.dispatch`` per step message (its context is the message's ``traceparent``
header, the parent of the worker's ``agentflow.step``).

Everything here is a no-op costing one flag test while tracing is off: the wrappers call
straight through, :func:`dispatch_traceparent` is not called at all (see
:meth:`WriteSet.dispatch_attempt`).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentflow_bus import tracing as otel

if TYPE_CHECKING:
    from agentflow_control_plane.engine.rows import RunRow, StepRow
    from agentflow_core.planners import StepResult

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

SERVICE_NAME = "agentflow-control-plane"

#: probes and scrapes: a trace each every few seconds would bury the real ones
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

FINAL_RUN = ("succeeded", "failed", "cancelled")


def setup() -> bool:
    return otel.setup(SERVICE_NAME)


class TracingMiddleware:
    """A SERVER span per HTTP request, named ``METHOD /route/{template}`` (never an id),
    continuing the caller's trace when the request carries a W3C ``traceparent``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not otel.ON or scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        parent = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                parent = value.decode("latin-1")
                break
        method = scope["method"]
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        attributes = {"http.request.method": method, "url.scheme": scope.get("scheme", "http")}
        with otel.span(method, parent=parent if otel.parse(parent) else None, kind=otel.SERVER,
                       attributes=attributes) as span:  # fmt: skip
            assert span is not None
            try:
                await self.app(scope, receive, capture)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    otel.fail(f"HTTP {status}", span)


def _run_attributes(tenant: str, workflow: str | None, run_id: uuid.UUID) -> dict[str, Any]:
    attributes: dict[str, Any] = {"agentflow.tenant": tenant, "agentflow.run_id": str(run_id)}
    if workflow:
        attributes["agentflow.workflow"] = workflow
    return attributes


def run_parent(run: RunRow) -> str:
    """The run's stored context; runs created before it was stored: the run id as trace id."""
    return run.traceparent or otel.fresh_traceparent(run.id.hex)


# --- run creation -------------------------------------------------------------------------


def traced_create(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``services.runs.create_run`` in an ``agentflow.run.create`` span (the run's stored context)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not otel.ON:
            return await fn(*args, **kwargs)
        repo: Any = args[0]
        attributes = {"agentflow.tenant": repo.tenant, "agentflow.workflow": str(kwargs.get("workflow"))}
        with otel.span("agentflow.run.create", attributes=attributes) as span:
            created = await fn(*args, **kwargs)
            assert span is not None
            made: Any = created
            span.set_attributes({"agentflow.run_id": str(made.id), "agentflow.run_status": made.status,
                                 "agentflow.run_created": made.created})  # fmt: skip
            return created

    return wrapper


def run_traceparent(run_id: uuid.UUID) -> str:
    """What ``runs.traceparent`` stores for a new run: the current span's context (the
    ``agentflow.run.create`` span); with tracing off, a context in trace ``run_id``."""
    if otel.ON:
        current = otel.current_traceparent()
        if current is not None:
            otel.annotate({"agentflow.run_id": str(run_id)})
            return current
    return otel.fresh_traceparent(run_id.hex)


# --- the engine ---------------------------------------------------------------------------


def traced_result(
    fn: Callable[Concatenate[S, StepRow, RunRow, Any, Any, Any, StepResult, P], None],
) -> Callable[Concatenate[S, StepRow, RunRow, Any, Any, Any, StepResult, P], None]:
    """``ResultProcessor._finish_attempt`` (one step result, accepted or rejected) in an
    ``agentflow.result`` span, child of the run's stored context."""

    @functools.wraps(fn)
    def wrapper(
        self: S, step: StepRow, run: RunRow, workflow: Any, writes: Any, now: Any, result: StepResult, /,
        *args: P.args, **kwargs: P.kwargs,
    ) -> None:  # fmt: skip
        if not otel.ON:
            return fn(self, step, run, workflow, writes, now, result, *args, **kwargs)
        attributes = _run_attributes(step.tenant, run.key[1], run.id)
        attributes.update({"agentflow.step_id": str(step.id), "agentflow.step_name": step.state,
                           "agentflow.agent": step.agent, "agentflow.attempt": step.attempt,
                           "agentflow.step_status": result.status})  # fmt: skip
        if step.worker:
            attributes["agentflow.worker"] = step.worker
        # (..., result, loaded, usage=None): the usage the result envelope reported
        usage = args[1] if len(args) > 1 else kwargs.get("usage")
        if isinstance(usage, dict):
            attributes.update(usage_attributes(usage))
        with otel.span("agentflow.result", parent=run_parent(run), attributes=attributes) as span:
            assert span is not None
            fn(self, step, run, workflow, writes, now, result, *args, **kwargs)
            if step.status == "queued":
                span.set_attribute("agentflow.retry_scheduled", True)
            if result.status == "rejected":
                otel.fail(result.error or "result rejected", span)
        return None

    return wrapper


def usage_attributes(usage: dict[str, Any]) -> dict[str, Any]:
    """Tokens and cost of a result envelope's ``usage`` (tokens only when a model was called)."""
    out: dict[str, Any] = {}
    if usage.get("llm_calls"):
        for key, name in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                          ("completion_tokens", "gen_ai.usage.output_tokens")):  # fmt: skip
            value = usage.get(key)
            if type(value) is int:
                out[name] = value
    cost = usage.get("cost_usd")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        out["agentflow.cost_usd"] = float(cost)
    return out


def traced_decision(fn: Callable[P, None]) -> Callable[P, None]:
    """``apply_decision`` in an ``agentflow.decision`` span: a child of the current span (the
    result being processed), else (timers) of the run's stored context."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        decision: Any = args[0]
        if not otel.ON or decision.ignored:
            return fn(*args, **kwargs)
        run: Any = kwargs["run"]
        spec: Any = kwargs["spec"]
        attributes = _run_attributes(str(kwargs["tenant"]), run.key[1], run.id)
        attributes.update({"agentflow.planner": str(getattr(spec.planner, "type", "")),
                           "agentflow.dispatched": len(decision.dispatch),
                           "agentflow.cancelled": len(decision.cancel)})  # fmt: skip
        parent = None if otel.has_current_span() else run_parent(run)
        with otel.span("agentflow.decision", parent=parent, attributes=attributes) as span:
            assert span is not None
            fn(*args, **kwargs)
            if run.status in FINAL_RUN:
                span.set_attribute("agentflow.run_status", run.status)
                if run.status == "failed":
                    otel.fail(run.error or "run failed", span)
        return None

    return wrapper


def dispatch_traceparent(
    *,
    tenant: str,
    workflow: str | None,
    run_id: uuid.UUID,
    step_id: uuid.UUID,
    body: dict[str, Any],
    queue: str,
    trace: str | None,
) -> str:
    """An ``agentflow.dispatch`` span for one step message (sealed into the outbox, published
    after the commit); returns its context, the message's ``traceparent``. A child of the
    current span (the decision, or the run's creation), else of the run's stored context."""
    attributes = _run_attributes(tenant, workflow, run_id)
    attributes.update({"agentflow.step_id": str(step_id), "agentflow.agent": body["agent"]["name"],
                       "agentflow.attempt": body["attempt"], "agentflow.queue": queue,
                       "messaging.system": "nats", "messaging.operation.type": "send"})  # fmt: skip
    parent = None if otel.has_current_span() else (trace or otel.fresh_traceparent(run_id.hex))
    span = otel.start("agentflow.dispatch", parent=parent, kind=otel.PRODUCER, attributes=attributes)
    span.end()
    return otel.traceparent_of(span) or otel.fresh_traceparent(run_id.hex)
