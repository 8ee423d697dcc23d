"""Every agent type a worker can run: built-ins, AgentMap's set, and installed plugins.

Importing this module stays cheap (no litellm, no Docker SDK): the LLM agent imports
litellm on its first step, so a worker that serves no LLM agent starts fast.
"""

from __future__ import annotations

import logging
from typing import Any

from agentflow_core.agent_plugins import load_plugin, plugin_types
from agentflow_worker.agents.base import Agent
from agentflow_worker.agents.builtin import BUILTIN_AGENTS
from agentflow_worker.agents.core import CORE_AGENTS
from agentflow_worker.agents.database import DATABASE_AGENTS
from agentflow_worker.agents.http import HTTP_AGENTS
from agentflow_worker.agents.llm import LLM_AGENTS
from agentflow_worker.agents.storage import STORAGE_AGENTS
from agentflow_worker.agents.tool_agent import TOOL_AGENTS

log = logging.getLogger("agentflow.worker.agents")


def _instantiate(target: Any) -> Agent:
    agent = target() if isinstance(target, type) else target
    if not callable(getattr(agent, "run", None)):
        raise TypeError(f"{target!r} has no run(ctx) method")
    return agent  # type: ignore[no-any-return]


def builtin_agents() -> dict[str, Agent]:
    return {
        **BUILTIN_AGENTS,
        **CORE_AGENTS,
        **HTTP_AGENTS,
        **DATABASE_AGENTS,
        **STORAGE_AGENTS,
        **LLM_AGENTS,
        **TOOL_AGENTS,
    }


def all_agents() -> dict[str, Agent]:
    """Built-in agents plus the ``agentflow.agents`` entry points; a plugin that fails to
    load is logged and left out (its steps fail with "no agent of type"), the rest run."""
    agents = builtin_agents()
    for name in sorted(plugin_types()):
        if name in agents:
            log.warning("agent plugin '%s' ignored: a built-in agent has that name", name)
            continue
        try:
            agents[name] = _instantiate(load_plugin(name))
        except Exception:
            log.exception("agent plugin '%s' failed to load", name)
    return agents
