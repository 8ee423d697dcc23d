"""What a worker shares with every agent it runs: secrets, tools, sandboxes, progress, clients.

One :class:`WorkerServices` per worker process, handed to agents as ``ctx.services``.
Shared state that must outlive a step lives here (HTTP circuit breakers, connection
pools), so e.g. a failing host trips one breaker for all steps of the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agentflow_worker.secrets import SecretStore

if TYPE_CHECKING:
    from agentflow_worker.tools.runtime import ToolRuntime


class ProgressSink(Protocol):
    async def emit(self, tenant: str, run: str, step: str, attempt: int, kind: str, data: dict[str, Any]) -> None:
        """Send a progress event (e.g. ``kind="token"``, ``data={"delta": "..."}``); never raises."""
        ...


class BudgetGate(Protocol):
    async def before_llm_call(
        self, tenant: str, run: str, step: str, estimate_usd: float, estimate_tokens: int
    ) -> None:
        """Raise AgentError (with the numbers) when the call must not be made."""
        ...


class DiscardProgress:
    async def emit(self, tenant: str, run: str, step: str, attempt: int, kind: str, data: dict[str, Any]) -> None:
        return None


@dataclass
class WorkerServices:
    secrets: SecretStore = field(default_factory=SecretStore)
    tools: ToolRuntime | None = None
    progress: ProgressSink = field(default_factory=DiscardProgress)
    #: root of the per-tenant workspaces of the storage agents (``<root>/<tenant>/``)
    workspace_root: Path = field(default_factory=lambda: Path("./agentflow-workspace"))
    #: database connections of the ``database`` agent: name -> DSN
    databases: dict[str, str] = field(default_factory=dict)
    #: prices of models litellm does not know (on-prem): model -> {"input_per_million": $,
    #: "output_per_million": $}
    llm_prices: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the budget check made before each model call (budgets proper: the governance issue)
    budget: BudgetGate | None = None
    #: per-process singletons agents keep between steps (breakers, pools), by key; whoever
    #: creates one that holds resources registers its close in ``closers``
    shared: dict[str, Any] = field(default_factory=dict)
    #: closed when the worker stops (MCP sessions, HTTP clients, pools), newest first
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def aclose(self) -> None:
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:  # one failing close must not keep the others open
                logging.getLogger("agentflow.worker").exception("closing a worker service failed")
