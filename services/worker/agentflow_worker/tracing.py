"""The worker's spans (see docs/observability.md, "Tracing").

``agentflow.step`` per step attempt, a child of the step message's ``traceparent`` header
(the control plane's ``agentflow.dispatch`` span); inside it ``chat <model>`` per model
call (each retry its own span), ``execute_tool <tool>`` per tool call and
``agentflow.sandbox`` per program run in a sandbox.

While tracing is off the wrappers test one flag and call straight through.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from opentelemetry.trace import Span

from agentflow_bus import tracing as otel

P = ParamSpec("P")
S = TypeVar("S")
R = TypeVar("R")

SERVICE_NAME = "agentflow-worker"


def setup() -> bool:
    return otel.setup(SERVICE_NAME)


def _step_parent(headers: dict[str, str] | None, run: str) -> str:
    parent = (headers or {}).get("traceparent")
    if otel.parse(parent) is not None:
        assert parent is not None
        return parent
    # A message without trace context (published by hand, or by an old control plane):
    # the run's legacy trace, whose id is the run id.
    return otel.fresh_traceparent(run.replace("-", "") if len(run) == 36 else os.urandom(16).hex())


def traced_step(
    fn: Callable[Concatenate[S, Any, Any, P], Awaitable[None]],
) -> Callable[Concatenate[S, Any, Any, P], Awaitable[None]]:
    """``Worker._execute(msg, step, digest)`` in an ``agentflow.step`` span."""

    @functools.wraps(fn)
    async def wrapper(self: S, msg: Any, step: Any, /, *args: P.args, **kwargs: P.kwargs) -> None:
        if not otel.ON:
            return await fn(self, msg, step, *args, **kwargs)
        agent = step["agent"]
        attributes = {
            "agentflow.tenant": step["tenant"],
            "agentflow.run_id": step["run"],
            "agentflow.step_id": step["step"],
            "agentflow.agent": agent["name"],
            "agentflow.agent_type": agent["type"],
            "agentflow.attempt": step["attempt"],
            "agentflow.delivery": msg.metadata.num_delivered or 1,
            "agentflow.worker": getattr(getattr(self, "settings", None), "worker_name", ""),
            "messaging.system": "nats",
            "messaging.operation.type": "process",
        }
        parent = _step_parent(msg.headers, step["run"])
        with otel.span("agentflow.step", parent=parent, kind=otel.CONSUMER, attributes=attributes) as span:
            assert span is not None
            try:
                await fn(self, msg, step, *args, **kwargs)
            except asyncio.CancelledError:
                span.set_attribute("agentflow.cancelled", True)
                raise
        return None

    return wrapper


def step_outcome(status: str, error: str | None, usage: dict[str, Any] | None) -> None:
    """What the step came to, on the current ``agentflow.step`` span."""
    if not otel.ON:
        return
    attributes: dict[str, Any] = {"agentflow.step_status": status}
    if usage:
        if usage.get("llm_calls"):  # a tool-only step has a cost but no tokens
            attributes["gen_ai.usage.input_tokens"] = usage.get("prompt_tokens", 0)
            attributes["gen_ai.usage.output_tokens"] = usage.get("completion_tokens", 0)
        attributes["agentflow.cost_usd"] = usage.get("cost_usd", 0.0)
    otel.annotate(attributes)
    if status != "succeeded":
        otel.fail(error or status)


# --- model calls --------------------------------------------------------------------------


def llm_call(provider: str, model: str, route: str, attempt: int) -> contextlib.AbstractContextManager[Span | None]:
    """One request to a model (``chat <model>``, GenAI semantic conventions)."""
    if not otel.ON:
        return otel.NOOP
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "gen_ai.request.model": model,
        "agentflow.llm_route": route,
        "agentflow.llm_attempt": attempt,
    }
    return otel.span(f"chat {model}", kind=otel.CLIENT, attributes=attributes)


def llm_usage(model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float, price_source: str) -> None:
    """Tokens and cost of the model call in progress."""
    if otel.ON:
        otel.annotate({
            "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "gen_ai.usage.output_tokens": completion_tokens,
            "agentflow.cost_usd": cost_usd,
            "agentflow.price_source": price_source,
        })  # fmt: skip


# --- tools and sandboxes ------------------------------------------------------------------


def traced_tool_call(
    fn: Callable[Concatenate[S, Any, str, P], Awaitable[R]],
) -> Callable[Concatenate[S, Any, str, P], Awaitable[R]]:
    """``ToolRuntime.call(ctx, tool_id, ...)`` in an ``execute_tool <tool>`` span; a call
    whose outcome is not ``ok`` (denied, invalid input, timeout...) is marked failed."""

    @functools.wraps(fn)
    async def wrapper(self: S, ctx: Any, tool_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if not otel.ON:
            return await fn(self, ctx, tool_id, *args, **kwargs)
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool_id,
            "agentflow.tenant": ctx.tenant,
            "agentflow.run_id": ctx.run,
            "agentflow.step_id": ctx.step,
            "agentflow.agent": ctx.agent_name,
            "agentflow.attempt": ctx.attempt,
        }
        with otel.span(f"execute_tool {tool_id}", attributes=attributes) as span:
            assert span is not None
            outcome = await fn(self, ctx, tool_id, *args, **kwargs)
            record = getattr(outcome, "record", None) or {}
            span.set_attributes({
                "agentflow.tool_outcome": str(record.get("outcome", "")),
                "agentflow.cost_usd": float(record.get("cost_usd") or 0.0),
            })  # fmt: skip
            if not getattr(outcome, "ok", True):
                otel.fail(str(getattr(outcome, "error", None) or record.get("outcome") or "tool call failed"), span)
            return outcome

    return wrapper


def traced_sandbox(
    fn: Callable[Concatenate[S, Any, Any, Any, P], Awaitable[R]],
) -> Callable[Concatenate[S, Any, Any, Any, P], Awaitable[R]]:
    """A sandboxed program run (``spec, profile, request``) in an ``agentflow.sandbox`` span.
    A program the sandbox had to stop (timeout, memory, processes, output) is marked
    failed; a non-zero exit is only recorded (``code_executor`` reports it as a result)."""

    @functools.wraps(fn)
    async def wrapper(self: S, spec: Any, profile: Any, request: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if not otel.ON:
            return await fn(self, spec, profile, request, *args, **kwargs)
        argv = getattr(request, "argv", None) or [""]
        attributes = {
            "agentflow.tool": str(getattr(spec, "id", "")),
            "agentflow.sandbox.runtime": str(getattr(profile, "runtime", "")),
            "process.executable.name": os.path.basename(str(argv[0])),
        }
        with otel.span("agentflow.sandbox", attributes=attributes) as span:
            assert span is not None
            result = await fn(self, spec, profile, request, *args, **kwargs)
            span.set_attributes({
                "process.exit.code": int(getattr(result, "exit_code", 0)),
                "agentflow.sandbox.duration_s": float(getattr(result, "duration_s", 0.0)),
                "agentflow.sandbox.truncated": bool(getattr(result, "truncated", False)),
            })  # fmt: skip
            reason = getattr(result, "reason", None)
            if reason:
                span.set_attribute("agentflow.sandbox.reason", str(reason))
                otel.fail(f"sandbox stopped the program: {reason}", span)
            return result

    return wrapper
