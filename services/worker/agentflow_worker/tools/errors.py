"""Errors of tool calls."""

from agentflow_worker.agents.base import AgentError


class ToolFailure(AgentError):
    """A tool call failed; the message says why."""
