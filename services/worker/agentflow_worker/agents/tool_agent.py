"""``tool``: a step that is one registry tool call.

Its arguments: the step input, or the ``input`` setting with ``{input.field}`` placeholders
filled from the step.

The call goes through the tool runtime like an LLM's tool call does, so permissions,
schemas, rate limits, cost and the call record all apply.
"""

from __future__ import annotations

from typing import Any

from agentflow_core.agent_configs.core import ToolCallConfig
from agentflow_worker.agents.base import AgentError, StepContext, parse_config
from agentflow_worker.agents.templating import render_value, step_scope


class ToolAgent:
    async def run(self, ctx: StepContext) -> Any:
        config = parse_config(ToolCallConfig, ctx)
        runtime = ctx.svc.tools
        if runtime is None:
            raise AgentError("this worker has no tool runtime")
        arguments = render_value(config.input, step_scope(ctx)) if config.input is not None else ctx.input
        outcome = await runtime.call(ctx, config.tool, arguments, allowed=[config.tool])
        if not outcome.ok:
            raise AgentError(outcome.error or f"tool '{config.tool}' failed")
        return outcome.output


TOOL_AGENTS = {"tool": ToolAgent()}
