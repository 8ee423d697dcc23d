"""AgentMap's core agents: ``default``, ``success``, ``failure`` and ``branching``.

``echo``, ``sleep``, ``fail`` and ``constant`` live in :mod:`agentflow_worker.agents.builtin`.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pydantic import BaseModel

from agentflow_core.agent_configs.core import BranchingConfig, DefaultConfig, FailureConfig, NoSettings
from agentflow_worker.agents.base import Agent, AgentError, StepContext, parse_config

log = logging.getLogger(__name__)

_C = TypeVar("_C", bound=BaseModel)

#: strings a branching field may hold, read as booleans (AgentMap passes flags around as text)
_FALSE_WORDS = frozenset({"false", "no", "off", "0", ""})
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})


class DefaultAgent:
    """Returns its ``output`` setting if set, else the step input (AgentMap's pass-through)."""

    async def run(self, ctx: StepContext) -> Any:
        cfg = parse_config(DefaultConfig, ctx)
        if cfg.message:
            log.info("default agent %s (run %s, step %s): %s", ctx.agent_name, ctx.run, ctx.step, cfg.message)
        return cfg.output if cfg.output is not None else ctx.input


class SuccessAgent:
    """Always succeeds, returning the step input."""

    async def run(self, ctx: StepContext) -> Any:
        parse_config(NoSettings, ctx)
        return ctx.input


class FailureAgent:
    """Always fails with its ``message``."""

    async def run(self, ctx: StepContext) -> Any:
        raise AgentError(parse_config(FailureConfig, ctx).message)


def truthy(value: Any) -> bool:
    """JSON truthiness, with the usual words for flags that arrive as strings."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _FALSE_WORDS:
            return False
        if word in _TRUE_WORDS:
            return True
    return bool(value)


_ABSENT = object()


def _field(data: dict[str, Any], name: str) -> Any:
    """``name`` as a key, else as a dotted path (``result.ok``) through nested objects."""
    if name in data:
        return data[name]
    value: Any = data
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


class BranchingAgent:
    """Succeeds or fails on a field of the input, steering to ``on_success`` or ``on_error``."""

    async def run(self, ctx: StepContext) -> Any:
        cfg = parse_config(BranchingConfig, ctx)
        data = ctx.input
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise AgentError(
                f"branching: the input is a {type(data).__name__}, not an object with a '{cfg.field}' field"
            )
        value = _field(data, cfg.field)
        decided = cfg.default if value is _ABSENT else truthy(value)
        if not decided:
            if value is _ABSENT:
                raise AgentError(f"branching: '{cfg.field}' is missing from the input and default is false")
            raise AgentError(f"branching: '{cfg.field}' is false")
        return {"branch": "success", "field": cfg.field, "value": None if value is _ABSENT else value, "input": data}


CORE_AGENTS: dict[str, Agent] = {
    "default": DefaultAgent(),
    "success": SuccessAgent(),
    "failure": FailureAgent(),
    "branching": BranchingAgent(),
}
