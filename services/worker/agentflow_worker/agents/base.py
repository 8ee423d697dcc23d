"""The agent interface, the step context and what a step reports besides its output.

An agent is any object with ``async def run(self, ctx) -> output``. Custom agents
subclass :class:`BaseAgent` (typed config, lifecycle hooks) and register through the
``agentflow.agents`` entry-point group; see docs/agents.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from agentflow_worker.services import WorkerServices


class AgentError(Exception):
    """An agent's own failure: the step fails with this message (and may be retried)."""


@dataclass(slots=True)
class LlmUsage:
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    #: where the price came from: "litellm" (its price map), "config" (price table), "unknown"
    price_source: str = "litellm"


@dataclass(slots=True)
class StepMeter:
    """What a step spent and called, reported in its result envelope (``usage``, ``tool_calls``)."""

    llm_calls: list[LlmUsage] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cost_usd(self) -> float:
        return sum(c.cost_usd for c in self.llm_calls) + sum(float(t.get("cost_usd", 0.0)) for t in self.tool_calls)

    @property
    def total_tokens(self) -> int:
        return sum(c.prompt_tokens + c.completion_tokens for c in self.llm_calls)

    def summary(self) -> dict[str, Any] | None:
        if not self.llm_calls and not self.tool_calls:
            return None
        return {
            "prompt_tokens": sum(c.prompt_tokens for c in self.llm_calls),
            "completion_tokens": sum(c.completion_tokens for c in self.llm_calls),
            "cost_usd": round(self.cost_usd, 10),
            "llm_calls": [
                {
                    "model": c.model,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "cost_usd": round(c.cost_usd, 10),
                    "price_source": c.price_source,
                }
                for c in self.llm_calls
            ],
            "tool_calls": len(self.tool_calls),
        }


@dataclass(slots=True)
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
    #: workflow-declared tool specs the agent lists (raw dicts from the envelope)
    workflow_tools: list[dict[str, Any]] = field(default_factory=list)
    services: WorkerServices | None = None
    meter: StepMeter = field(default_factory=StepMeter)
    #: the step's budget reservation from its envelope (``budget``): dollars and tokens
    #: that its model and tool calls together may never exceed; None: no cap
    budget_usd: float | None = None
    budget_tokens: int | None = None

    @property
    def input(self) -> Any:
        return self.payload.get("input")

    @property
    def last(self) -> Any:
        return self.payload.get("last")

    @property
    def svc(self) -> WorkerServices:
        if self.services is None:
            raise AgentError("this agent needs worker services (secrets, tools) that were not provided")
        return self.services


class Agent(Protocol):
    async def run(self, ctx: StepContext) -> Any: ...


class BaseAgent:
    """Base class for custom agents.

    Set ``Config`` to a pydantic model to get ``self.config(ctx)`` validated (a bad
    setting fails the step with the field named). Hooks: ``setup``/``close`` once per
    worker, ``on_start``/``on_finish`` around every step (``error`` is None on success).
    """

    Config: ClassVar[type[BaseModel] | None] = None

    async def setup(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def on_start(self, ctx: StepContext) -> None:
        return None

    async def on_finish(self, ctx: StepContext, output: Any, error: BaseException | None) -> None:
        return None

    def config(self, ctx: StepContext) -> Any:
        if self.Config is None:
            return ctx.config
        return parse_config(self.Config, ctx)

    async def run(self, ctx: StepContext) -> Any:
        raise NotImplementedError


_C = TypeVar("_C", bound=BaseModel)


def parse_config(model: type[_C], ctx: StepContext) -> _C:
    """The agent's settings as ``model``; a bad one fails the step naming the field."""
    try:
        return model.model_validate(ctx.config)
    except ValidationError as exc:
        raise AgentError(config_error(ctx.agent_name, exc)) from exc


def config_error(agent_name: str, exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in exc.errors(include_url=False)]
    return f"agent '{agent_name}' has invalid settings: " + "; ".join(parts)
