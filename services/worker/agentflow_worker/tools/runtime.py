"""The tool registry at run time: every tool call goes through :meth:`ToolRuntime.call`.

The order of checks is the permission model (docs/tools.md):

1. the agent lists the tool (deny by default),
2. the tenant policy allows it, and its network/secret asks
   (:class:`~agentflow_core.exec_profile.ExecProfileCompiler` → an ExecProfile),
3. the input satisfies the tool's ``input_schema``,
4. the call's ``cost_per_call`` fits in what is left of the step's budget reservation
   (``ctx.budget_usd``, from the step envelope),
5. the tenant's rate limit for the tool has room (shared by all workers),
6. the named secrets exist,
7. the handler runs (in a sandbox, or over MCP) under the profile's timeout,
8. the output satisfies ``output_schema``.

Whatever happens, exactly one record (tool, tenant, run, step, input/output hashes,
duration, cost, outcome) is emitted through :class:`ToolRecorder`. A failed call is an
outcome, not an exception: the LLM agent hands the reason to the model, the ``tool``
agent fails its step with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from agentflow_core.canonical import content_hash
from agentflow_core.errors import AgentFlowError, CanonicalizationError
from agentflow_core.exec_profile import ExecProfile, ExecProfileCompiler, ToolDenied
from agentflow_core.tools import RateLimit, ToolSpec, schema_errors, tool_listed
from agentflow_core.tools_config import ToolsConfig
from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.secrets import SecretStore
from agentflow_worker.tracing import traced_tool_call

log = logging.getLogger("agentflow.tools")

#: outcomes of a tool call, as recorded
OUTCOMES = ("ok", "denied", "invalid_input", "budget_exceeded", "rate_limited", "error", "timeout", "invalid_output")


class ToolHandlerImpl(Protocol):
    async def invoke(self, spec: ToolSpec, profile: ExecProfile, arguments: dict[str, Any], env: dict[str, str]) -> Any:
        """Run the tool; raise ToolFailure (or AgentError) with a clear reason when it fails."""
        ...


class McpTools(Protocol):
    """The MCP adapter, as the runtime sees it (see agentflow_worker.tools.mcp)."""

    async def list_tools(self, server: str) -> list[ToolSpec]: ...


class RateLimiter(Protocol):
    async def acquire(self, key: str, limit: RateLimit) -> float:
        """0 when the call may proceed (and is counted), else seconds until it could."""
        ...


class ToolRecorder(Protocol):
    async def record(self, ctx: StepContext, record: dict[str, Any]) -> None: ...


class MeterRecorder:
    """Puts the record in the step's result envelope (``tool_calls``), where the control
    plane stores it with the step; and logs it."""

    async def record(self, ctx: StepContext, record: dict[str, Any]) -> None:
        ctx.meter.tool_calls.append(record)
        log.info("tool call %s tenant=%s run=%s outcome=%s %.1fms", record["tool"], record["tenant"], record["run"],
                 record["outcome"], record["duration_ms"])  # fmt: skip


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    ok: bool
    output: Any
    error: str | None
    record: dict[str, Any]


def _usd(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _hash(value: Any) -> str | None:
    try:
        return content_hash(value)
    except CanonicalizationError:
        return None


class ToolRuntime:
    def __init__(
        self,
        config: ToolsConfig,
        handlers: dict[str, ToolHandlerImpl],
        *,
        secrets: SecretStore,
        limiter: RateLimiter | None = None,
        recorder: ToolRecorder | None = None,
        mcp: McpTools | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        self.handlers = handlers
        self.secrets = secrets
        self.limiter = limiter
        self.recorder = recorder or MeterRecorder()
        self.mcp = mcp
        self.compiler = ExecProfileCompiler(config.tool_security)
        self._clock = clock

    # --- lookup -----------------------------------------------------------------------

    async def resolve(self, ctx: StepContext, tool_ids: list[str]) -> list[ToolSpec]:
        """The specs of the tools an agent lists (``server.*`` expands to the server's
        tools), each checked against the tenant policy. Raises ToolDenied / AgentError."""
        policy = self.config.policy_for(ctx.tenant)
        specs: list[ToolSpec] = []
        for tool_id in tool_ids:
            for spec in await self._lookup(ctx, tool_id):
                self.compiler.compile(spec, policy)  # refuse now rather than mid-conversation
                specs.append(spec)
        return specs

    async def _lookup(self, ctx: StepContext, tool_id: str) -> list[ToolSpec]:
        for raw in ctx.workflow_tools:
            if raw.get("id") == tool_id:
                try:
                    return [ToolSpec.model_validate(raw)]
                except ValidationError as exc:
                    raise AgentError(f"workflow tool '{tool_id}' is invalid: {exc.errors()[0]['msg']}") from exc
        declared = self.config.declared().get(tool_id)
        if declared is not None:
            return [declared]
        if self.config.is_mcp_reference(tool_id):
            if self.mcp is None:
                raise AgentError(f"tool '{tool_id}' is an MCP tool, but MCP is not enabled on this worker")
            server, _, name = tool_id.partition(".")
            listed = await self.mcp.list_tools(server)
            if name == "*":
                return listed
            for spec in listed:
                if spec.id == tool_id:
                    return [spec]
            raise AgentError(f"MCP server '{server}' has no tool '{name}'")
        raise AgentError(f"unknown tool '{tool_id}' (not built in, not in the tools config, not in the workflow)")

    # --- calls ------------------------------------------------------------------------

    @traced_tool_call
    async def call(self, ctx: StepContext, tool_id: str, arguments: Any, *, allowed: list[str]) -> ToolOutcome:
        started_us = time.time_ns() // 1000
        began = self._clock()
        spec: ToolSpec | None = None
        output: Any = None
        charged = False
        try:
            if not tool_listed(tool_id, allowed):
                raise ToolDenied(f"tool '{tool_id}' is not listed in agent '{ctx.agent_name}' tools (deny by default)")
            found = await self._lookup(ctx, tool_id)
            spec = found[0]
            profile = self.compiler.compile(spec, self.config.policy_for(ctx.tenant))
            if not isinstance(arguments, dict):
                raise _Outcome("invalid_input", f"tool '{tool_id}' input must be a JSON object")
            problems = schema_errors(spec.input_schema, arguments)
            if problems:
                reason = f"tool '{tool_id}' input does not match its schema: " + "; ".join(problems)
                raise _Outcome("invalid_input", reason)
            cost = spec.cost_per_call
            # Before the rate limiter, so a refused call does not use up the tenant's quota.
            if cost > 0 and ctx.budget_usd is not None and ctx.meter.cost_usd + cost > ctx.budget_usd:
                raise _Outcome(
                    "budget_exceeded",
                    f"budget_exceeded: tool '{tool_id}' costs ${_usd(cost)} per call; the step's budget reservation "
                    f"is ${_usd(ctx.budget_usd)} (spent ${_usd(ctx.meter.cost_usd)})",
                )
            limit = spec.limit
            if limit is not None and self.limiter is not None:
                wait = await self.limiter.acquire(f"{ctx.tenant}.{tool_id}", limit)
                if wait > 0:
                    raise _Outcome(
                        "rate_limited",
                        f"tool '{tool_id}' rate limit {spec.rate_limit} reached for tenant '{ctx.tenant}'; "
                        f"next call allowed in {wait:.1f}s",
                    )
            env = {name: self.secrets.get(ctx.tenant, name) for name in profile.secrets}
            handler = self.handlers.get(spec.handler.kind)
            if handler is None:
                raise _Outcome("error", f"this worker cannot run '{spec.handler.kind}' tools")
            charged = True
            try:
                # The sandbox enforces the profile's timeout itself; this one is the
                # backstop for handlers that do not (MCP over HTTP).
                async with asyncio.timeout(profile.timeout_s + 5):
                    output = await handler.invoke(spec, profile, arguments, env)
            except TimeoutError:
                raise _Outcome("timeout", f"tool '{tool_id}' timed out after {profile.timeout_s:g}s") from None
            if spec.output_schema is not None:
                problems = schema_errors(spec.output_schema, output)
                if problems:
                    raise _Outcome(
                        "invalid_output",
                        f"tool '{tool_id}' returned output that does not match its schema: " + "; ".join(problems),
                    )
            outcome, error = "ok", None
        except _Outcome as exc:
            outcome, error = exc.outcome, exc.message
        except ToolDenied as exc:
            outcome, error = "denied", exc.message
        except (AgentError, AgentFlowError) as exc:
            outcome, error = "error", getattr(exc, "message", None) or str(exc)
        except Exception as exc:  # a handler bug must not take the step's reason away
            log.exception("tool %s raised", tool_id)
            outcome, error = "error", f"tool '{tool_id}' failed: {type(exc).__name__}: {exc}"
        record = {
            "tool": tool_id,
            "tenant": ctx.tenant,
            "run": ctx.run,
            "step": ctx.step,
            "agent": ctx.agent_name,
            "input_hash": _hash(arguments),
            "output_hash": _hash(output) if outcome == "ok" else None,
            "started_us": started_us,
            "duration_ms": round((self._clock() - began) * 1000, 3),
            "cost_usd": spec.cost_per_call if (spec is not None and charged) else 0.0,
            "outcome": outcome,
            "error": error,
        }
        await self.recorder.record(ctx, record)
        return ToolOutcome(outcome == "ok", output if outcome == "ok" else None, error, record)


class _Outcome(Exception):
    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
