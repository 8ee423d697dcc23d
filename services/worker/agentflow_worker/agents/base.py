"""The agent interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class AgentError(Exception):
    """An agent's own failure: the step fails with this message (and may be retried)."""


@dataclass(frozen=True, slots=True)
class StepContext:
    tenant: str
    run: str
    step: str
    seq: int
    attempt: int
    delivery: int
    agent_name: str
    config: dict[str, Any]
    payload: dict[str, Any]

    @property
    def input(self) -> Any:
        return self.payload.get("input")

    @property
    def last(self) -> Any:
        return self.payload.get("last")


class Agent(Protocol):
    async def run(self, ctx: StepContext) -> Any: ...
