"""AgentFlow's pure domain code, shared by the control plane, the workers and users.

Nothing in this package performs I/O: no FastAPI, database or NATS imports. Planners,
envelopes and spec models are plain functions and pydantic models, testable in
microseconds and replayable from recorded results.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentflow_core.client import AgentFlowClient, AsyncAgentFlowClient

__all__ = ["AgentFlowClient", "AsyncAgentFlowClient", "__version__"]


def __getattr__(name: str) -> Any:
    # The SDK (httpx and its models) loads only when asked for: the control plane and the
    # workers import agentflow_core modules everywhere and never need it.
    if name in ("AgentFlowClient", "AsyncAgentFlowClient"):
        from agentflow_core import client

        return getattr(client, name)
    raise AttributeError(f"module 'agentflow_core' has no attribute '{name}'")
