"""Settings of the core agents (AgentMap's set plus the test/benchmark helpers)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoSettings(_Config):
    """``echo``, ``default``, ``success``: nothing to set."""


class SleepConfig(_Config):
    ms: int = Field(0, ge=0, le=86_400_000)


class FailConfig(_Config):
    times: int = Field(1, ge=0)


class ConstantConfig(_Config):
    output: Any = None


class DefaultConfig(_Config):
    """``default``: returns its ``output`` if set, else the input (AgentMap's pass-through)."""

    output: Any = None
    message: str | None = Field(None, max_length=10_000)


class BranchingConfig(_Config):
    """``branching``: succeeds or fails on a field of the input, to drive on_success/on_error.

    The decision field is read from the input (``success`` by default); a missing field is
    ``default``. AgentMap's BranchingAgent does the same with ``last_action_success``.
    """

    field: str = Field("success", min_length=1, max_length=256)
    default: bool = True


class FailureConfig(_Config):
    """``failure``: always fails, with ``message``."""

    message: str = Field("failure agent: failing on purpose", max_length=10_000)


class ToolCallConfig(_Config):
    """``tool``: calls one registry tool with the step's input (or ``input`` if set)."""

    tool: str = Field(min_length=1, max_length=256)
    input: Any = None


CORE_CONFIGS: dict[str, type[BaseModel]] = {
    "echo": NoSettings,
    "sleep": SleepConfig,
    "fail": FailConfig,
    "constant": ConstantConfig,
    "default": DefaultConfig,
    "success": NoSettings,
    "branching": BranchingConfig,
    "failure": FailureConfig,
    "tool": ToolCallConfig,
}
