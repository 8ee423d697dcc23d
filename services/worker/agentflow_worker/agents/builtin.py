"""Built-in agents: ``echo``, ``sleep``, ``fail``, ``constant`` and the planner's ``llm_plan``."""

from __future__ import annotations

import asyncio
from typing import Any

from agentflow_worker.agents.base import Agent, AgentError, StepContext
from agentflow_worker.agents.llm_plan import LlmPlanAgent


class EchoAgent:
    """Returns the run input unchanged."""

    async def run(self, ctx: StepContext) -> Any:
        return ctx.input


class SleepAgent:
    """Waits ``ms`` milliseconds, then returns the run input (for tests and benchmarks)."""

    async def run(self, ctx: StepContext) -> Any:
        await asyncio.sleep(int(ctx.config.get("ms", 0)) / 1000)
        return ctx.input


class FailAgent:
    """Fails its first ``times`` attempts (default 1), then returns the run input."""

    async def run(self, ctx: StepContext) -> Any:
        times = int(ctx.config.get("times", 1))
        if ctx.attempt <= times:
            raise AgentError(f"failing on purpose (attempt {ctx.attempt} of the first {times})")
        return ctx.input


class ConstantAgent:
    """Returns its configured ``output`` (examples, tests, stubbing a step out)."""

    async def run(self, ctx: StepContext) -> Any:
        return ctx.config.get("output")


BUILTIN_AGENTS: dict[str, Agent] = {
    "echo": EchoAgent(),
    "sleep": SleepAgent(),
    "fail": FailAgent(),
    "constant": ConstantAgent(),
    "llm_plan": LlmPlanAgent(),
}
