"""Preflight estimates on the control plane: :mod:`agentflow_core.cost_model` with this
installation's prices and token counter.

Prices: ``AGENTFLOW_LLM_PRICES`` (the same table the workers read, keyed by model or
``provider/model``), else litellm's bundled price map when the ``llm`` extra is installed.
Tokens: litellm's ``token_counter`` (with ``HF_HUB_OFFLINE=1``: it never reaches for a
tokenizer download). litellm takes seconds to import, so it is imported in the background
when the control plane starts; estimates made before it is ready count ``len / 4`` tokens
and say so in their notes.

Workflows without LLM, tool or plugin agents cost nothing and are answered from a cache
keyed by the (cached, immutable) spec, so plain workflows pay nothing for estimates on ``POST /v1/runs``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agentflow_core.cost_model import (
    Correction,
    CostEnv,
    ModelPrice,
    PlanEstimate,
    StepEstimate,
    estimate_plan,
    estimate_step,
    tool_cost_lookup,
)
from agentflow_core.spec import AgentSpec, WorkflowSpec
from agentflow_core.tools_config import ToolsConfig

log = logging.getLogger("agentflow.estimates")

#: agent types known to cost nothing (no model, no priced tool)
FREE_TYPES = frozenset({"echo", "default", "branching", "success", "failure", "sleep", "fail", "http", "database",
                        "csv_reader", "csv_writer", "json_reader", "json_writer", "file_reader",
                        "file_writer"})  # fmt: skip


class Estimator:
    def __init__(self, prices: dict[str, dict[str, float]], tools: ToolsConfig) -> None:
        self._prices = prices
        self._tools = tools
        self._litellm: Any = None
        # id(spec) -> (spec, estimate); the spec is kept so its id cannot be reused
        self._free: dict[int, tuple[WorkflowSpec, PlanEstimate]] = {}

    def load_litellm_in_background(self) -> None:
        def load() -> None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import litellm
            except ImportError:
                log.info("litellm is not installed (extra 'llm'): estimates count tokens as len/4")
                return
            module: Any = litellm
            module.telemetry = False
            module.suppress_debug_info = True
            module.disable_hf_tokenizer_download = True
            logging.getLogger("LiteLLM").setLevel(logging.WARNING)
            self._litellm = module

        threading.Thread(target=load, name="litellm-import", daemon=True).start()

    def _price(self, route: str) -> ModelPrice | None:
        model = route.split("/", 1)[1] if "/" in route else route
        for key in (model, route):
            entry = self._prices.get(key)
            if entry is not None:
                return ModelPrice.per_million(
                    float(entry.get("input_per_million", 0.0)), float(entry.get("output_per_million", 0.0))
                )
        litellm = self._litellm
        if litellm is None:
            return None
        try:
            prompt, completion = litellm.cost_per_token(model=route, prompt_tokens=1_000_000, completion_tokens=0)
            _, out = litellm.cost_per_token(model=route, prompt_tokens=0, completion_tokens=1_000_000)
        except Exception:  # not in litellm's map
            return None
        return ModelPrice.per_million(float(prompt) + float(completion), float(out))

    def _count(self, route: str, messages: list[dict[str, Any]]) -> int:
        litellm = self._litellm
        if litellm is not None:
            try:
                return int(litellm.token_counter(model=route, messages=messages))
            except Exception:
                pass
        return len(json.dumps(messages)) // 4 + 1

    @staticmethod
    def _is_free(spec: WorkflowSpec) -> bool:
        return all(agent.type in FREE_TYPES for agent in spec.agents.values()) and spec.planner.type != "llm"

    def _env(self, spec: WorkflowSpec, corrections: Mapping[tuple[str, str], Correction] | None) -> CostEnv:
        return CostEnv(
            price_of=self._price,
            count_tokens=self._count,
            tool_cost=tool_cost_lookup(spec, self._tools),
            corrections=corrections or {},
        )

    def estimate(
        self, spec: WorkflowSpec, run_input: Any, corrections: Mapping[tuple[str, str], Correction] | None = None
    ) -> PlanEstimate:
        free = self._is_free(spec)
        if free:
            cached = self._free.get(id(spec))
            if cached is not None:
                return cached[1]
        estimate = estimate_plan(spec, run_input, self._env(spec, corrections))
        if self._litellm is None and not free:
            estimate = _with_note(estimate, "tokens counted as len/4: litellm was not loaded yet")
        if free:
            if len(self._free) > 10_000:
                self._free.clear()
            self._free[id(spec)] = (spec, estimate)
        return estimate

    def needs_costing(self, spec: WorkflowSpec) -> bool:
        """Whether steps of ``spec`` may cost anything (free workflows skip per-step estimates)."""
        return not self._is_free(spec)

    def step(
        self,
        spec: WorkflowSpec,
        agent_name: str,
        agent: AgentSpec,
        payload: Mapping[str, Any],
        corrections: Mapping[tuple[str, str], Correction] | None = None,
    ) -> StepEstimate | None:
        """One step's estimate with its real payload; None for an agent type that costs nothing."""
        if agent.type in FREE_TYPES:
            return None
        return estimate_step(agent_name, agent, payload, self._env(spec, corrections))


def _with_note(estimate: PlanEstimate, note: str) -> PlanEstimate:
    return replace(estimate, notes=(*estimate.notes, note))


@dataclass(slots=True)
class Costing:
    """What an engine transaction needs to estimate the steps it dispatches."""

    estimator: Estimator
    #: tenant -> its learnt correction factors (see ``governance.calibration``)
    corrections: dict[str, Mapping[tuple[str, str], Correction]] = field(default_factory=dict)
