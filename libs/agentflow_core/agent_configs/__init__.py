"""The settings each built-in agent type accepts, as pydantic models.

The control plane validates an agent's settings against its type's model when a workflow
is registered (a typo is a 422 naming ``agents.<name>.<field>``, not a failed step an
hour later); the worker parses the same model when the step runs. Custom agent types
(the ``agentflow.agents`` entry-point group) may declare a ``Config`` model of their own.
"""

from __future__ import annotations

from pydantic import BaseModel

from agentflow_core.agent_configs.core import CORE_CONFIGS
from agentflow_core.agent_configs.database import DatabaseAgentConfig
from agentflow_core.agent_configs.http import HttpAgentConfig
from agentflow_core.agent_configs.llm import LlmAgentConfig
from agentflow_core.agent_configs.storage import STORAGE_CONFIGS

AGENT_CONFIGS: dict[str, type[BaseModel]] = {
    **CORE_CONFIGS,
    "llm": LlmAgentConfig,
    "http": HttpAgentConfig,
    "database": DatabaseAgentConfig,
    **STORAGE_CONFIGS,
}

__all__ = ["AGENT_CONFIGS"]
