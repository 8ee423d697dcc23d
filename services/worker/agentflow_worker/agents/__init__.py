"""Agents a worker can run, by type name."""

from agentflow_worker.agents.base import Agent, AgentError, StepContext
from agentflow_worker.agents.builtin import BUILTIN_AGENTS

__all__ = ["BUILTIN_AGENTS", "Agent", "AgentError", "StepContext"]
