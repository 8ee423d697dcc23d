"""Preflight cost model: tokens and dollars per step and per plan, before a run starts.

Pure: no I/O, no litellm. Whatever depends on the installation (prices, the token
counter, tool prices, prompt files, calibration history) comes in through :class:`CostEnv`.
The control plane builds one per request and calls :func:`estimate_plan` (``dry_run``,
run admission) or :func:`estimate_step` (a reservation per dispatched step, with the
step's real payload), and after a run turns each estimate and the step's reported usage
into an :class:`Observation` for :func:`learn_corrections` / :func:`error_stats`.

**One step** (:func:`estimate_step`), by agent type:

* ``llm``: the ``system`` and ``prompt`` settings are resolved (``env.resolve_prompt``)
  and rendered from the step payload with the worker's template grammar (a minimal copy
  of ``agentflow_worker.agents.templating``: ``agentflow_core`` must not import the
  worker). A placeholder that cannot be filled before the run (it reads an earlier step's
  output) stays in the text as written, with a note; so does one that would fail at run
  time. ``output_schema`` adds the worker's instruction to the system message. Prompt
  tokens: ``env.count_tokens`` on the messages (tool declarations are not counted; the
  prompt correction absorbs them). Completion tokens: the observed mean for the
  (agent, model) if there is one, else ``max_tokens`` (an upper bound, noted). Both are
  then multiplied by the learnt :class:`Correction`. One model call is expected; the
  extra calls of a tool loop or a schema repair are what the corrections learn (the
  expected tokens are still kept within the step's worst case).
  Expected tool spend: the observed mean per step (``env.observed_tool_cost``), else 0.
* ``llm_plan`` (the LLM planner's ``__planner__`` step): the payload's messages, the
  planner model's ``max_tokens`` (default 2048).
* ``tool``: its tool's ``cost_per_call``, no tokens.
* every other built-in type: free. A plugin type: free, with a note (it is not modelled).

**Worst case of a step** (``max_cost_usd``, ``max_tokens_total``: what a budget
reservation needs), per attempt, times the agent's ``retry.max_attempts``:

* model calls: 1, + ``max_iterations`` with tools (the worker allows that many tool
  rounds, each followed by another call), + 1 with ``output_schema`` (one repair);
* every call completes ``max_tokens`` (4096 if unset, like the worker's budget check)
  and its prompt grows by the previous answers: call ``k`` (from 0) has
  ``prompt + k * max_tokens`` tokens. Tool results also grow it and nothing in the spec
  bounds them: noted, and a prompt correction above 1 is applied to the worst case
  (one below 1 is not);
* fallback models are not added on top: each call is priced once, at the highest input
  and output price among the primary and fallback models, with the largest prompt
  count and ``max_tokens`` among them (a failed call costs nothing);
* tools: one call of the most expensive listed tool per tool round. Several calls in
  one round would exceed this; the spec has no bound for that (noted);
* the agent's own ``max_total_tokens`` / ``max_cost_usd`` ceilings cap an attempt (the
  worker checks them before every call; tool calls of the last round come on top of
  ``max_cost_usd``).

**Plans** (:func:`estimate_plan`). ``steps`` is the expected path in dispatch order;
its sums are the expected totals. The worst case is a set of (step, dispatch bound)
items, capped by the plan's ``max_steps`` seq guard: the ``max_steps`` dispatches with
the highest cost (and, separately, token) bounds are summed, so it is an upper bound for
cost and for tokens, not one path. Engine retries are inside each step's bound
(attempts are not seqs).

* FSM. Expected: from ``initial_state``, each state takes its fall-through transition
  (``on_success``), else its first conditional transition, else ``on_true``, else
  ``on_false``, skipping targets already on the path (a loop is expected to be left
  after one pass); it ends at a final state, at a ``router`` state (the route is only
  known at run time, noted) or where every way out was visited. Worst: every state
  reachable by any transition (errors and timeouts included), entered at most once if
  it is on no cycle, else ``max_visits`` times, else once per entry of its predecessors
  (finite when every loop through it passes a state with ``max_visits``); a loop with no
  ``max_visits`` on it is bounded only by ``max_steps`` (``bounded`` is then False).
  ``on_failure: conservative`` adds ``max_replans`` re-runs per state.
* DAG: every step once, in waves (the steps whose dependencies are done, in spec order).
  Steps with a ``condition`` are expected to run (noted). Worst: every step, times
  ``1 + max_replans`` under ``conservative``.
* Behavior tree: the tree is walked assuming every action and condition succeeds:
  sequences run all children, fallbacks stop at the first success (usually the first
  child), parallels run all children, a conditional_selector its first branch, retry
  runs its child once (again only if it fails, e.g. under an inverter), repeat ``times``
  passes. Worst: every action, conditional_selector branches summed (each pass of an
  enclosing loop may choose another), times the product of the enclosing
  ``retry.max_attempts`` and ``repeat.times``, times ``1 + max_replans`` for a
  ``conservative`` tree (it reruns whole).
* Guarded LLM planner: the planning step (its real prompt, built by the planner) and,
  since the plan is written at run time, each allowed agent once (at most ``max_steps``;
  noted). Worst: the planning step, its repair (the answer is sent back: ``max_tokens``
  more prompt), and ``max_steps`` (times ``1 + max_replans`` under ``conservative``)
  dispatches of the most expensive allowed agent.
* A ``fallback`` plan (or an ``adaptive`` replanner) that the planner would switch to
  adds its own worst case; it is not expected.

``bounded`` is False when only the ``max_steps`` runaway guard bounds the worst case.
Costs in :meth:`PlanEstimate.as_dict` are floats rounded to 10 decimal places, like the
worker's usage records.

**Calibration**: :func:`learn_corrections` keeps, per (agent, model route), the median of
the recent ratios actual / *uncorrected* estimate (``raw_prompt_tokens``,
``raw_completion_tokens``: corrections must not compound), separately for prompt and
completion tokens. :func:`error_stats` reports p50/p95 relative errors.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Final

from agentflow_core.agent_configs import AGENT_CONFIGS
from agentflow_core.agent_configs.llm import LlmAgentConfig, ModelSettings
from agentflow_core.expressions import EvaluationError, Expression, ExpressionError, Scope
from agentflow_core.planners.common import Checks, PlannerCommon, empty_vars
from agentflow_core.planners.llm import PLAN_STATE, PLANNER_AGENT, REPAIRS, LlmPlanner, planner_agent_spec
from agentflow_core.planners.models import (
    BtNode,
    BtPlannerSpec,
    DagPlannerSpec,
    FsmPlannerSpec,
    FsmState,
    LlmPlannerSpec,
)
from agentflow_core.spec import AgentSpec, WorkflowSpec, inline_agent
from agentflow_core.strongly_connected import strongly_connected
from agentflow_core.templating import TemplateSyntaxError, parse_template, placeholder_text, value_text
from agentflow_core.tools_config import ToolsConfig

#: completion tokens assumed when ``max_tokens`` is not set (the worker's budget check does the same)
UNBOUNDED_COMPLETION_ESTIMATE: Final = 4096
#: ``max_tokens`` of the LLM planner's planning call when its model sets none (the worker's default)
PLAN_MAX_TOKENS_DEFAULT: Final = 2048
#: learnt factors are kept in this range: a few absurd samples must not zero or explode estimates
MIN_FACTOR: Final = 0.01
MAX_FACTOR: Final = 100.0
#: decimal places of the dollar amounts in ``as_dict``
USD_PLACES: Final = 10

# Mirrors agentflow_worker.agents.llm: what it appends to the system message for output_schema.
_SCHEMA_INSTRUCTION = "Answer with only a JSON value (no prose, no code fences) that satisfies this JSON Schema:\n"
# Mirrors agentflow_worker.agents.llm_prompts._REF: settings that name a prompt instead of being one.
_PROMPT_REF = re.compile(r"^(?:prompt:[A-Za-z0-9_.\-/]+|file:\S+|yaml:[^\s#]+#\S+)$")
_FREE_TYPES = frozenset(AGENT_CONFIGS) - {"llm", "tool"}


class _Unknown:
    """A value that only exists once the run is under way (an earlier step's output)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


#: pass as a payload's ``input`` or ``last`` (or inside them) for data unknown at preflight
UNKNOWN: Final = _Unknown()


def _identity(text: str) -> str:
    return text


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per token."""

    input_per_token: float
    output_per_token: float

    @classmethod
    def per_million(cls, input_usd: float, output_usd: float) -> ModelPrice:
        """From the per-million prices of the worker's price table (``input_per_million``...)."""
        return cls(input_usd / 1e6, output_usd / 1e6)


@dataclass(frozen=True, slots=True)
class Correction:
    """Multiplicative factors learnt from history (1.0: none)."""

    prompt: float = 1.0
    completion: float = 1.0
    samples: int = 0


@dataclass(frozen=True, slots=True)
class CostEnv:
    """Everything installation-specific the model needs.

    ``price_of``: litellm route (``provider/model``) to price, None when unknown (cost 0,
    noted). ``count_tokens``: (route, chat messages) to prompt tokens (litellm's
    ``token_counter`` in production). ``tool_cost``: tool id to ``cost_per_call`` (see
    :func:`tool_cost_lookup`). ``resolve_prompt``: a ``prompt:``/``file:``/``yaml:``
    setting to its text; may raise (the raw setting is counted, noted). Histories are
    keyed by (agent name, route): ``observed_completion`` (mean completion tokens per
    step, preferred over ``max_tokens``), ``observed_tool_cost`` (mean tool dollars per
    step of an LLM agent), ``corrections`` (from :func:`learn_corrections`).
    """

    price_of: Callable[[str], ModelPrice | None]
    count_tokens: Callable[[str, list[dict[str, Any]]], int]
    tool_cost: Callable[[str], float] = lambda _tool: 0.0
    resolve_prompt: Callable[[str], str] = _identity
    corrections: Mapping[tuple[str, str], Correction] = field(default_factory=dict)
    observed_completion: Mapping[tuple[str, str], float] = field(default_factory=dict)
    observed_tool_cost: Mapping[tuple[str, str], float] = field(default_factory=dict)


# --- outputs ------------------------------------------------------------------------------


def _usd(value: float) -> float:
    return round(value, USD_PLACES)


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """One dispatched step. ``prompt_tokens``/``completion_tokens``/``cost_usd``: expected
    (corrected); ``raw_*``: before corrections (what an :class:`Observation` records);
    ``max_cost_usd``/``max_tokens_total``: upper bound over all ``attempts``."""

    agent: str
    agent_type: str
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    llm_calls: int
    tool_cost_usd: float
    cost_usd: float
    max_cost_usd: float
    max_tokens_total: int
    notes: tuple[str, ...] = ()
    #: the plan element (FSM state, tree node, DAG step) when part of a plan estimate
    node: str | None = None
    raw_prompt_tokens: int = 0
    raw_completion_tokens: int = 0
    attempts: int = 1
    #: False when a model involved has no known price (its tokens were counted at $0)
    price_known: bool = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "agent": self.agent,
            "agent_type": self.agent_type,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "raw_prompt_tokens": self.raw_prompt_tokens,
            "raw_completion_tokens": self.raw_completion_tokens,
            "llm_calls": self.llm_calls,
            "tool_cost_usd": _usd(self.tool_cost_usd),
            "cost_usd": _usd(self.cost_usd),
            "max_cost_usd": _usd(self.max_cost_usd),
            "max_tokens_total": self.max_tokens_total,
            "attempts": self.attempts,
            "price_known": self.price_known,
            "notes": list(self.notes),
        }


@dataclass(frozen=True, slots=True)
class PlanEstimate:
    planner: str
    #: the expected path, in dispatch order
    steps: tuple[StepEstimate, ...]
    expected_cost_usd: float
    expected_tokens: int
    expected_steps: int
    worst_cost_usd: float
    worst_tokens: int
    worst_steps: int
    #: False when only the ``max_steps`` runaway guard bounds the worst case
    bounded: bool
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; dollar amounts are floats rounded to 10 decimal places."""
        return {
            "planner": self.planner,
            "expected_cost_usd": _usd(self.expected_cost_usd),
            "expected_tokens": self.expected_tokens,
            "expected_steps": self.expected_steps,
            "worst_cost_usd": _usd(self.worst_cost_usd),
            "worst_tokens": self.worst_tokens,
            "worst_steps": self.worst_steps,
            "bounded": self.bounded,
            "steps": [s.as_dict() for s in self.steps],
            "notes": list(self.notes),
        }


# --- templates (the worker's grammar; see agentflow_worker.agents.templating) ---------------


def _has_unknown(value: Any) -> bool:
    if value is UNKNOWN:
        return True
    if isinstance(value, dict):
        return any(_has_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_unknown(v) for v in value)
    return False


_MISSING: Final = object()


def _lookup(path: tuple[str, ...], scope: Mapping[str, Any], input_unknown: bool) -> Any:
    """The value, UNKNOWN (fillable only at run time) or _MISSING (the worker would fail)."""
    head = path[0]
    if head not in scope:
        # With an unknown input, any other name may be one of its top-level keys.
        return UNKNOWN if input_unknown else _MISSING
    value = scope[head]
    for segment in path[1:]:
        if value is UNKNOWN:
            return UNKNOWN
        if isinstance(value, dict):
            if segment not in value:
                return _MISSING
            value = value[segment]
        elif isinstance(value, list):
            if not segment.isdigit() or int(segment) >= len(value):
                return _MISSING
            value = value[int(segment)]
        else:
            return _MISSING
    return UNKNOWN if _has_unknown(value) else value


def render_preflight(template: str, payload: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """``template`` filled from a step payload (``{"input", "last"}``) as the worker would,
    and notes. Placeholders that cannot be filled (UNKNOWN data, or missing fields the
    worker would fail on) are kept as written; bad braces keep the whole text."""
    try:
        parts = parse_template(template)
    except TemplateSyntaxError as exc:
        return template, (f"template error, the step would fail: {exc}",)
    data = payload.get("input")
    scope: dict[str, Any] = dict(data) if isinstance(data, dict) else {}
    scope["input"] = data
    scope["last"] = payload.get("last")
    input_unknown = data is UNKNOWN
    out: list[str] = []
    unknown: list[str] = []
    missing: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = _lookup(part, scope, input_unknown)
        written = placeholder_text(part)
        if value is UNKNOWN:
            unknown.append(written)
            out.append(written)
        elif value is _MISSING:
            missing.append(written)
            out.append(written)
        else:
            out.append(value_text(value))
    notes: list[str] = []
    if unknown:
        notes.append(f"placeholders filled only at run time, counted as written: {', '.join(unknown)}")
    if missing:
        notes.append(f"placeholders with no such field, the step would fail: {', '.join(missing)}")
    return "".join(out), tuple(notes)


# --- one step -----------------------------------------------------------------------------


def model_route(provider: str, model: str) -> str:
    """litellm's ``provider/model`` (as the worker's ``model_route``)."""
    prefix = f"{provider}/"
    return model if model.startswith(prefix) else prefix + model


@dataclass(frozen=True, slots=True)
class _Model:
    route: str
    max_tokens: int
    price: ModelPrice | None


def _count(env: CostEnv, route: str, messages: list[dict[str, Any]], notes: list[str]) -> int:
    try:
        return int(env.count_tokens(route, messages))
    except Exception as exc:  # an injected counter must not fail run creation
        notes.append(f"token counter failed for {route} ({exc}); estimated from length")
        return len(json.dumps(messages, default=str)) // 4 + 1


def _price(env: CostEnv, route: str, notes: list[str]) -> ModelPrice | None:
    try:
        price = env.price_of(route)
    except Exception as exc:
        notes.append(f"price lookup failed for {route} ({exc})")
        return None
    if price is None:
        notes.append(f"no price known for {route}: its tokens are counted at $0")
    return price


def _tool_price(env: CostEnv, tool: str, notes: list[str]) -> float:
    try:
        return float(env.tool_cost(tool))
    except Exception as exc:
        notes.append(f"cost of tool '{tool}' unknown ({exc}): counted at $0")
        return 0.0


def _setting(env: CostEnv, setting: str, payload: Mapping[str, Any], what: str, notes: list[str]) -> str:
    try:
        template = env.resolve_prompt(setting)
    except Exception as exc:
        notes.append(f"{what}: reference not resolved ({exc}); counted as written")
        template = setting
    else:
        if template == setting and _PROMPT_REF.match(setting.strip()):
            notes.append(f"{what}: reference '{setting.strip()}' not resolved at preflight; counted as written")
    text, render_notes = render_preflight(template, payload)
    notes.extend(f"{what}: {n}" for n in render_notes)
    return text


@lru_cache(maxsize=512)
def _llm_config(config_json: str) -> tuple[LlmAgentConfig, dict[str, Any] | None]:
    # The spec was validated at registration; validating output_schema again (a JSON
    # Schema meta-check, ~0.5 ms) is left out, the schema is only needed as text.
    config = json.loads(config_json)
    schema = config.pop("output_schema", None)
    return LlmAgentConfig.model_validate(config), schema


def _dedup(notes: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(notes))


def _cost(price: ModelPrice | None, prompt: float, completion: float) -> float:
    if price is None:
        return 0.0
    return prompt * price.input_per_token + completion * price.output_per_token


def _llm_step(agent_name: str, agent: AgentSpec, payload: Mapping[str, Any], env: CostEnv) -> StepEstimate:
    notes: list[str] = []
    config, schema = _llm_config(json.dumps(agent.config, sort_keys=True, default=str))
    system = _setting(env, config.system, payload, "system", notes) if config.system else None
    prompt = _setting(env, config.prompt, payload, "prompt", notes)
    if schema is not None:
        instruction = _SCHEMA_INSTRUCTION + json.dumps(schema, ensure_ascii=False)
        system = f"{system}\n\n{instruction}" if system else instruction
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})

    settings: list[ModelSettings] = [config.model, *config.fallback_models]
    models: list[_Model] = []
    prompt_counts: dict[str, int] = {}
    for s in settings:
        route = model_route(s.provider, s.model)
        if route not in prompt_counts:
            prompt_counts[route] = _count(env, route, messages, notes)
        if s.max_tokens is None:
            notes.append(f"{route}: max_tokens not set, {UNBOUNDED_COMPLETION_ESTIMATE} assumed")
        models.append(_Model(route, s.max_tokens or UNBOUNDED_COMPLETION_ESTIMATE, _price(env, route, notes)))
    primary = models[0]
    key = (agent_name, primary.route)
    correction = env.corrections.get(key, Correction())

    # Worst case of one attempt: see the module docstring.
    calls = 1 + (config.max_iterations if config.tools else 0) + (1 if schema is not None else 0)
    base = max(prompt_counts.values())
    per_call_completion = max(m.max_tokens for m in models)
    worst_prompt = math.ceil(
        (calls * base + per_call_completion * calls * (calls - 1) // 2) * max(1.0, correction.prompt)
    )
    worst_completion = calls * per_call_completion
    priced = [m.price for m in models if m.price is not None]
    worst_price = ModelPrice(
        max((p.input_per_token for p in priced), default=0.0), max((p.output_per_token for p in priced), default=0.0)
    )
    tool_costs = [_tool_price(env, t, notes) for t in config.tools]
    max_tool = max(tool_costs, default=0.0)
    attempt_cost = _cost(worst_price, worst_prompt, worst_completion) + config.max_iterations * max_tool
    if config.tools:
        notes.append("worst case: tool results and parallel tool calls are not bounded by the spec")
    if config.max_cost_usd is not None:
        attempt_cost = min(attempt_cost, config.max_cost_usd + max_tool)
    attempt_tokens = worst_prompt + worst_completion
    if config.max_total_tokens is not None:
        attempt_tokens = min(attempt_tokens, config.max_total_tokens)

    raw_prompt = prompt_counts[primary.route]
    observed = env.observed_completion.get(key)
    if observed is not None:
        raw_completion = max(0, round(observed))
    else:
        raw_completion = primary.max_tokens
        notes.append("completion counted at max_tokens (an upper bound: no history yet)")
    # A factor learnt on tool loops may exceed one call; never beyond what an attempt can use.
    prompt_tokens = min(round(raw_prompt * correction.prompt), worst_prompt)
    completion_tokens = min(round(raw_completion * correction.completion), worst_completion)
    tool_expected = float(env.observed_tool_cost.get(key, 0.0))
    if config.tools and key not in env.observed_tool_cost:
        notes.append("tool calls: none expected without history (tool declarations not counted in the prompt)")
    cost = min(_cost(primary.price, prompt_tokens, completion_tokens) + tool_expected, attempt_cost)
    attempts = agent.retry.max_attempts
    return StepEstimate(
        agent=agent_name,
        agent_type=agent.type,
        model=primary.route,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        llm_calls=1,
        tool_cost_usd=tool_expected,
        cost_usd=cost,
        max_cost_usd=attempt_cost * attempts,
        max_tokens_total=attempt_tokens * attempts,
        notes=_dedup(notes),
        raw_prompt_tokens=raw_prompt,
        raw_completion_tokens=raw_completion,
        attempts=attempts,
        price_known=len(priced) == len(models),
    )


def _plan_call_step(
    agent_name: str, agent: AgentSpec, payload: Mapping[str, Any], env: CostEnv, extra_prompt: int = 0
) -> StepEstimate:
    """The LLM planner's planning call; ``extra_prompt``: tokens a repair adds (the answer sent back)."""
    notes: list[str] = []
    model = payload.get("model") or agent.config.get("model") or {}
    route = model_route(str(model.get("provider", "openai")), str(model.get("model", "")))
    max_tokens = int(model.get("max_tokens") or PLAN_MAX_TOKENS_DEFAULT)
    messages = payload.get("messages")
    if not isinstance(messages, list):
        notes.append("planning step without messages: prompt counted as empty")
        messages = []
    raw_prompt = _count(env, route, messages, notes) + extra_prompt
    key = (agent_name, route)
    correction = env.corrections.get(key, Correction())
    observed = env.observed_completion.get(key)
    raw_completion = max(0, round(observed)) if observed is not None else max_tokens
    price = _price(env, route, notes)
    prompt_tokens = round(raw_prompt * correction.prompt)
    completion_tokens = round(raw_completion * correction.completion)
    worst_prompt = math.ceil(raw_prompt * max(1.0, correction.prompt))
    attempts = agent.retry.max_attempts
    return StepEstimate(
        agent=agent_name,
        agent_type=agent.type,
        model=route,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        llm_calls=1,
        tool_cost_usd=0.0,
        cost_usd=_cost(price, prompt_tokens, completion_tokens),
        max_cost_usd=_cost(price, worst_prompt, max_tokens) * attempts,
        max_tokens_total=(worst_prompt + max_tokens) * attempts,
        notes=_dedup(notes),
        raw_prompt_tokens=raw_prompt,
        raw_completion_tokens=raw_completion,
        attempts=attempts,
        price_known=price is not None,
    )


def _flat_step(agent_name: str, agent: AgentSpec, cost: float, notes: list[str]) -> StepEstimate:
    attempts = agent.retry.max_attempts
    return StepEstimate(
        agent=agent_name,
        agent_type=agent.type,
        model=None,
        prompt_tokens=0,
        completion_tokens=0,
        llm_calls=0,
        tool_cost_usd=cost,
        cost_usd=cost,
        max_cost_usd=cost * attempts,
        max_tokens_total=0,
        notes=_dedup(notes),
        attempts=attempts,
    )


def estimate_step(agent_name: str, agent: AgentSpec, payload: Mapping[str, Any], env: CostEnv) -> StepEstimate:
    """Estimate one step of ``agent`` given its dispatch payload (``StepRequest.payload``:
    ``{"input", "last"}``, or the planning call's ``{"messages", "model"}``). Parts not
    known yet may be :data:`UNKNOWN`."""
    if agent.type == "llm":
        return _llm_step(agent_name, agent, payload, env)
    if agent.type == "llm_plan":
        return _plan_call_step(agent_name, agent, payload, env)
    notes: list[str] = []
    if agent.type == "tool":
        tool = agent.config.get("tool")
        return _flat_step(agent_name, agent, _tool_price(env, str(tool), notes) if tool else 0.0, notes)
    if agent.type not in _FREE_TYPES:
        notes.append(f"agent type '{agent.type}' is not modelled: counted as free")
    return _flat_step(agent_name, agent, 0.0, notes)


def tool_cost_lookup(spec: WorkflowSpec | None = None, tools: ToolsConfig | None = None) -> Callable[[str], float]:
    """``CostEnv.tool_cost`` for an installation: built-in, tools-config and workflow tools,
    and MCP tools (``server.tool``) at their server's ``cost_per_call``. Unknown: 0."""
    config = tools or ToolsConfig()
    table = {tool_id: t.cost_per_call for tool_id, t in config.declared().items()}
    if spec is not None:
        table.update({t.id: t.cost_per_call for t in spec.tools})
    servers = {name: s.cost_per_call for name, s in config.mcp.servers.items()} if config.mcp.enabled else {}

    def cost(tool_id: str) -> float:
        found = table.get(tool_id)
        if found is not None:
            return found
        server, dot, _ = tool_id.partition(".")
        return servers.get(server, 0.0) if dot else 0.0

    return cost


# --- plans --------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _expression(source: str) -> Expression | None:
    try:
        return Expression(source)
    except ExpressionError:
        return None


_INPUT_PATH = re.compile(r"^\s*\$\.input(?![A-Za-z0-9_])")


def _preflight_value(spec: Any, run_input: Any) -> Any:
    """An input mapping's value before the run: leaves that read only the run input are
    evaluated, the others (earlier outputs, ``last``) are UNKNOWN."""
    if isinstance(spec, str):
        expr = _expression(spec)
        if expr is None:
            return UNKNOWN
        reads_input_only = (
            _INPUT_PATH.match(expr.source) is not None if expr.kind == "jsonpath" else expr.names() <= {"input"}
        )
        if not reads_input_only:
            return UNKNOWN
        try:
            return expr.evaluate(Scope(input=run_input, outputs={}))
        except EvaluationError:
            return UNKNOWN
    if isinstance(spec, dict):
        return {str(k): _preflight_value(v, run_input) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_preflight_value(v, run_input) for v in spec]
    return spec


@dataclass(slots=True)
class _Worst:
    cost: float
    tokens: int
    steps: int
    bounded: bool

    def __add__(self, other: _Worst) -> _Worst:
        return _Worst(
            self.cost + other.cost, self.tokens + other.tokens, self.steps + other.steps, self.bounded and other.bounded
        )


#: (step, dispatch bound or None when only the seq guard bounds it)
_Item = tuple[StepEstimate, int | None]


def _cap(items: Sequence[_Item], cap: int) -> _Worst:
    """The worst case of ``items`` when at most ``cap`` dispatches happen: the costliest
    dispatches (and, separately, the most token-hungry) fill the cap."""
    counts = [(est, cap if n is None else min(n, cap)) for est, n in items]
    steps = min(cap, sum(n for _, n in counts))

    def fill(weight: Callable[[StepEstimate], float]) -> float:
        left, total = steps, 0.0
        for est, n in sorted(counts, key=lambda c: weight(c[0]), reverse=True):
            if left <= 0:
                break
            take = min(n, left)
            total += take * weight(est)
            left -= take
        return total

    return _Worst(
        cost=fill(lambda e: e.max_cost_usd),
        tokens=round(fill(lambda e: e.max_tokens_total)),
        steps=steps,
        bounded=all(n is not None for _, n in items),
    )


class _Plan:
    """One estimate_plan call: the env, the run input, and the steps estimated so far."""

    def __init__(self, spec: WorkflowSpec, run_input: Any, env: CostEnv) -> None:
        self.agents = spec.agents
        self.run_input = run_input
        self.env = env
        self.notes: list[str] = []
        self._cache: dict[tuple[str, int, int], tuple[Any, Any, StepEstimate]] = {}

    def step(self, node: str, agent: str, step_input: Any, last: Any) -> StepEstimate:
        # The same agent on the same (identical) data renders the same prompt: count once.
        key = (agent, id(step_input), id(last))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is step_input and hit[1] is last:
            est = hit[2]
        else:
            est = estimate_step(agent, self.agents[agent], {"input": step_input, "last": last}, self.env)
            self._cache[key] = (step_input, last, est)  # keeps the objects alive: ids stay unique
        return replace(est, node=node)

    def input_of(self, mapping: Any) -> Any:
        return self.run_input if mapping is None else _preflight_value(mapping, self.run_input)


class _Full(Exception):
    """The expected path reached the plan's max_steps (the run would fail there)."""


class _Path:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.steps: list[StepEstimate] = []

    def add(self, est: StepEstimate) -> None:
        if len(self.steps) >= self.limit:
            raise _Full
        self.steps.append(est)

    def last(self) -> Any:
        # The first dispatched step sees last=None; later ones an output unknown yet.
        return None if not self.steps else UNKNOWN


def _replans(pspec: PlannerCommon) -> int:
    return pspec.on_failure.max_replans if pspec.on_failure.policy == "conservative" else 0


# FSM -----------------------------------------------------------------------------------------


def _fsm_agent(name: str, st: FsmState) -> str | None:
    if st.agent is None and st.condition is None and st.router is None:
        return name  # the seed's style: a state named after its agent (checked at registration)
    return st.agent


def _fsm_edges(st: FsmState) -> list[str]:
    out = [t for t in (st.on_success, st.on_error, st.on_timeout, st.on_true, st.on_false) if t is not None]
    return out + [tr.target for tr in st.conditional_transitions]


def _cyclic(nodes: Sequence[str], edges: Mapping[str, Sequence[str]]) -> set[str]:
    """Nodes on some cycle: members of a multi-node component, or with an edge to themselves."""
    found: set[str] = set()
    for component in strongly_connected(nodes, edges):
        if len(component) > 1 or component[0] in edges.get(component[0], ()):
            found.update(component)
    return found


def _fsm_visits(
    pspec: FsmPlannerSpec, reachable: Sequence[str], edges: Mapping[str, Sequence[str]], any_state: str
) -> dict[str, int | None]:
    """How often each reachable state can be entered (None: only max_steps bounds it).

    A state on no cycle: once. One with ``max_visits``: that. Any other state on a cycle:
    at most once per visit of its predecessors (+1 for the initial state), which is
    finite when every loop through it passes a state with ``max_visits``. Computed in
    topological order of those unguarded states; the ones on an unguarded cycle (and
    after one) stay None.
    """
    cyclic = _cyclic(reachable, edges)
    bound: dict[str, int | None] = {}
    unguarded: list[str] = []
    for n in reachable:
        st = pspec.states.get(n)
        if n not in cyclic:
            bound[n] = 1
        elif st is not None and st.max_visits is not None:
            bound[n] = st.max_visits
        else:
            unguarded.append(n)  # the virtual "any state" node too: it only passes visits on
    open_ = set(unguarded)
    preds: dict[str, list[str]] = {n: [] for n in unguarded}
    waiting = dict.fromkeys(unguarded, 0)
    for src in reachable:
        # One visit leaves by one transition: a target named twice is entered once.
        for dst in dict.fromkeys(edges.get(src, ())):
            if dst in open_:
                preds[dst].append(src)
                if src in open_:
                    waiting[dst] += 1
    ready = deque(n for n in unguarded if waiting[n] == 0)
    while ready:
        n = ready.popleft()
        total: int | None = 1 if n == pspec.initial_state else 0
        for p in preds[n]:
            b = bound.get(p)
            total = None if total is None or b is None else total + b
        bound[n] = total
        for dst in dict.fromkeys(edges.get(n, ())):
            if dst in open_:
                waiting[dst] -= 1
                if waiting[dst] == 0:
                    ready.append(dst)
    return {n: bound.get(n) for n in reachable if n != any_state}


def _fsm(plan: _Plan, pspec: FsmPlannerSpec) -> tuple[list[StepEstimate], _Worst]:
    finals = pspec.finals()
    states = pspec.states
    inputs: dict[str, Any] = {}

    def state_input(name: str) -> Any:
        if name not in inputs:
            inputs[name] = plan.input_of(states[name].input)
        return inputs[name]

    path = _Path(pspec.max_steps)
    first_agent_state: str | None = None
    visited: set[str] = set()
    name = pspec.initial_state
    try:
        while name not in finals:
            visited.add(name)
            st = states[name]
            agent = _fsm_agent(name, st)
            if agent is not None:
                if first_agent_state is None:
                    first_agent_state = name
                path.add(plan.step(name, agent, state_input(name), path.last()))
            if st.router is not None:
                plan.notes.append(f"state '{name}' routes at run time ({st.router}): the expected path ends there")
                break
            candidates = [st.on_success, *(tr.target for tr in st.conditional_transitions), st.on_true, st.on_false]
            nxt = next((c for c in candidates if c is not None and (c in finals or c not in visited)), None)
            if nxt is None:
                plan.notes.append(f"every way out of state '{name}' loops back: the expected path ends there")
                break
            name = nxt
    except _Full:
        plan.notes.append(f"the expected path reaches max_steps={pspec.max_steps}")

    # Worst case: reachable states, with a virtual node standing for "any state" after a router.
    any_state = "\x00any"
    edges: dict[str, list[str]] = {n: _fsm_edges(st) for n, st in states.items()}
    for n, st in states.items():
        if st.router is not None:
            edges[n].append(any_state)
    edges[any_state] = list(states)
    reachable: list[str] = []
    seen = {pspec.initial_state}
    queue = deque([pspec.initial_state])
    while queue:
        current = queue.popleft()
        reachable.append(current)
        for t in edges.get(current, ()):
            if t not in seen and (t in states or t == any_state):
                seen.add(t)
                queue.append(t)
    visits = _fsm_visits(pspec, reachable, edges, any_state)
    replans = _replans(pspec)
    items: list[_Item] = []
    unbounded: list[str] = []
    for n in reachable:
        state = states.get(n)
        agent = _fsm_agent(n, state) if state is not None else None
        if state is None or agent is None:
            continue
        bound = visits[n]
        if bound is None:
            unbounded.append(n)
        last = None if n == first_agent_state else UNKNOWN
        items.append((plan.step(n, agent, state_input(n), last), None if bound is None else bound + replans))
    if unbounded:
        shown = ", ".join(unbounded[:10]) + (f" and {len(unbounded) - 10} more" if len(unbounded) > 10 else "")
        plan.notes.append(f"states on a loop with no max_visits (bounded only by max_steps): {shown}")
    return path.steps, _cap(items, pspec.max_steps)


# DAG -----------------------------------------------------------------------------------------


def _dag(plan: _Plan, pspec: DagPlannerSpec) -> tuple[list[StepEstimate], _Worst]:
    order = list(pspec.steps)
    position = {n: i for i, n in enumerate(order)}
    waiting = {n: len(set(s.depends_on)) for n, s in pspec.steps.items()}
    dependents: dict[str, list[str]] = {n: [] for n in order}
    for n, s in pspec.steps.items():
        for d in dict.fromkeys(s.depends_on):
            dependents[d].append(n)
    path = _Path(pspec.max_steps)
    conditional: list[str] = []
    wave = [n for n in order if waiting[n] == 0]
    estimates: list[StepEstimate] = []
    try:
        while wave:
            following: list[str] = []
            for n in wave:
                s = pspec.steps[n]
                if s.condition is not None:
                    conditional.append(n)
                last = None if not s.depends_on else UNKNOWN
                est = plan.step(n, s.agent or n, plan.input_of(s.input), last)
                estimates.append(est)
                path.add(est)
                for dep in dependents[n]:
                    waiting[dep] -= 1
                    if waiting[dep] == 0:
                        following.append(dep)
            wave = sorted(following, key=position.__getitem__)
    except _Full:
        plan.notes.append(f"the DAG has more steps than max_steps={pspec.max_steps}")
    if conditional:
        plan.notes.append(f"steps with a condition are expected to run: {', '.join(conditional)}")
    bound = 1 + _replans(pspec)
    return path.steps, _cap([(e, bound) for e in estimates], pspec.max_steps)


# Behavior tree -------------------------------------------------------------------------------

_SEQUENCES = frozenset({"sequence", "sequence_with_memory", "reactive_sequence"})
_FALLBACKS = frozenset({"fallback", "selector", "reactive_fallback"})


def _bt_children(node: BtNode, path: str) -> list[tuple[BtNode, str]]:
    """Children with the labels the planner gives them (name, or path from ``root``)."""
    if node.type == "conditional_selector":
        return [(b.child, f"{path}/{i}") for i, b in enumerate(node.conditions or [])]
    if node.child is not None:
        return [(node.child, f"{path}/0")]
    return [(c, f"{path}/{i}") for i, c in enumerate(node.children or [])]


def _parallel_needs(node: BtNode, n: int) -> int:
    value = node.success_threshold
    if value is None and node.success_policy is not None:
        policy = node.success_policy
        value = -1 if policy == "all" else 1 if policy == "one" else int(policy)
    if value is None or value == -1:
        return n
    return max(1, min(value, n))


def _bt(plan: _Plan, pspec: BtPlannerSpec) -> tuple[list[StepEstimate], _Worst]:
    path = _Path(pspec.max_steps)
    inputs: dict[int, Any] = {}

    def action(node: BtNode, label: str, last: Any) -> StepEstimate:
        if id(node) not in inputs:
            inputs[id(node)] = plan.input_of(node.input)
        assert node.agent is not None  # checked at registration
        return plan.step(label, node.agent, inputs[id(node)], last)

    def walk(node: BtNode, path_label: str) -> bool:
        """Expected dispatches of ``node``, every action and condition succeeding; its status."""
        label = node.name or path_label
        kind = node.type
        kids = _bt_children(node, path_label)
        if kind == "action":
            path.add(action(node, label, path.last()))
            return True
        if kind == "condition":
            return True
        if kind in _SEQUENCES:
            return all(walk(c, p) for c, p in kids)  # stops at the first failure, like the node
        if kind in _FALLBACKS:
            return any(walk(c, p) for c, p in kids)
        if kind == "parallel":
            results = [walk(c, p) for c, p in kids]
            return sum(results) >= _parallel_needs(node, len(kids))
        if kind == "conditional_selector":
            return walk(*kids[0]) if kids else False
        child, child_path = kids[0]
        if kind == "inverter":
            return not walk(child, child_path)
        if kind in ("force_success", "force_failure"):
            walk(child, child_path)
            return kind == "force_success"
        if kind in ("retry", "repeat"):
            limit = node.max_attempts if kind == "retry" else node.times
            for _ in range(limit or 1):
                before = len(path.steps)
                ok = walk(child, child_path)
                if ok != (kind == "repeat"):
                    return ok  # retry: succeeded; repeat: failed
                if len(path.steps) == before:
                    break  # a pass that dispatches nothing: the rest would too
            return kind == "repeat"
        return walk(child, child_path)  # timeout

    try:
        walk(pspec.root, "root")
    except _Full:
        plan.notes.append(f"the expected path reaches max_steps={pspec.max_steps}")

    restarts = 1 + _replans(pspec)
    first = path.steps[0].node if path.steps else None
    items: list[_Item] = []
    # Every action, with the product of its enclosing loop counts (iterative: deep trees).
    stack: list[tuple[BtNode, str, int]] = [(pspec.root, "root", restarts)]
    while stack:
        node, path_label, times = stack.pop()
        label = node.name or path_label
        if node.type == "action":
            items.append((action(node, label, None if label == first else UNKNOWN), times))
            continue
        if node.type == "retry":
            times *= node.max_attempts or 1
        elif node.type == "repeat":
            times *= node.times or 1
        for child, child_path in reversed(_bt_children(node, path_label)):
            stack.append((child, child_path, times))
    return path.steps, _cap(items, pspec.max_steps)


# Guarded LLM planner ---------------------------------------------------------------------------


def _llm(plan: _Plan, pspec: LlmPlannerSpec) -> tuple[list[StepEstimate], _Worst]:
    planner = LlmPlanner(pspec, plan.agents, Checks())
    payload = {
        "messages": planner.messages(plan.run_input, empty_vars(), None),
        "model": pspec.model.model_dump(mode="json"),
    }
    agent = inline_agent(planner_agent_spec(pspec))
    planning = replace(_plan_call_step(PLANNER_AGENT, agent, payload, plan.env), node=PLAN_STATE)
    allowed = list(dict.fromkeys(pspec.agents)) if pspec.agents is not None else list(plan.agents)
    allowed = [a for a in allowed if a in plan.agents and not a.startswith("__")]
    plan.notes.append("the LLM writes the plan at run time: expected assumes each allowed agent runs once")
    steps = [planning]
    estimates = [plan.step(a, a, plan.run_input, None) for a in allowed]
    steps.extend(estimates[: pspec.max_steps])

    max_tokens = pspec.model.max_tokens
    items: list[_Item] = [(planning, 1)]
    for attempt in range(REPAIRS):
        # A repair sends the rejected answer back (and the problems found, not counted).
        repair = _plan_call_step(PLANNER_AGENT, agent, payload, plan.env, extra_prompt=max_tokens * (attempt + 1))
        items.append((replace(repair, node=f"{PLAN_STATE} (repair)"), 1))
    runs = pspec.max_steps * (1 + _replans(pspec))
    items.extend((e, runs) for e in estimates)
    return steps, _cap(items, 1 + REPAIRS + runs)


_PlannerSpec = FsmPlannerSpec | BtPlannerSpec | DagPlannerSpec | LlmPlannerSpec


def _shape(plan: _Plan, pspec: _PlannerSpec) -> tuple[list[StepEstimate], _Worst]:
    if isinstance(pspec, FsmPlannerSpec):
        return _fsm(plan, pspec)
    if isinstance(pspec, DagPlannerSpec):
        return _dag(plan, pspec)
    if isinstance(pspec, BtPlannerSpec):
        return _bt(plan, pspec)
    return _llm(plan, pspec)


def _takeover(pspec: _PlannerSpec) -> _PlannerSpec | None:
    """The plan that takes over when ``pspec`` fails (as planners.registry.build_planner decides)."""
    policy = pspec.on_failure
    if not isinstance(pspec.fallback, str) and pspec.fallback is not None:
        if policy.policy in ("escalate", "adaptive") or isinstance(pspec, LlmPlannerSpec):
            return pspec.fallback
        return None
    if policy.policy == "adaptive" and policy.replanner:
        try:
            return LlmPlannerSpec.model_validate({"type": "llm", **policy.replanner})
        except ValueError:
            return None  # refused at registration
    return None


def _estimate(plan: _Plan, pspec: _PlannerSpec) -> tuple[list[StepEstimate], _Worst]:
    steps, worst = _shape(plan, pspec)
    other = _takeover(pspec)
    if other is not None:
        plan.notes.append(f"a failure hands over to a {other.type} plan: in the worst case only")
        _, extra = _estimate(plan, other)
        worst = worst + extra
    return steps, worst


def estimate_plan(spec: WorkflowSpec, run_input: Any, env: CostEnv) -> PlanEstimate:
    """Expected path and worst case of a run of ``spec`` on ``run_input`` (see the module docs)."""
    plan = _Plan(spec, run_input, env)
    steps, worst = _estimate(plan, spec.planner)
    unpriced = sorted({s.model for s in steps if not s.price_known and s.model})
    if unpriced:
        plan.notes.append(f"no price known for {', '.join(unpriced)}: counted at $0")
    if not worst.bounded:
        plan.notes.append("worst case bounded only by the max_steps runaway guard")
    return PlanEstimate(
        planner=spec.planner.type,
        steps=tuple(steps),
        expected_cost_usd=sum(s.cost_usd for s in steps),
        expected_tokens=sum(s.total_tokens for s in steps),
        expected_steps=len(steps),
        worst_cost_usd=worst.cost,
        worst_tokens=worst.tokens,
        worst_steps=worst.steps,
        bounded=worst.bounded,
        notes=_dedup(plan.notes),
    )


# --- calibration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """One finished step: the *uncorrected* estimate (``StepEstimate.raw_*``) and what it used.

    Record it only when the primary model answered (``usage`` names the model): a
    fallback's tokens say nothing about the primary's factors."""

    agent: str
    route: str
    est_prompt: int
    est_completion: int
    actual_prompt: int
    actual_completion: int
    #: the (corrected) estimated and the actual dollars, for error reports
    est_cost: float = 0.0
    actual_cost: float = 0.0


def observe(estimate: StepEstimate, *, actual_prompt: int, actual_completion: int, actual_cost: float) -> Observation:
    """The observation of a step estimated as ``estimate`` that used these tokens and dollars."""
    if estimate.model is None:
        raise ValueError(f"agent '{estimate.agent}' ({estimate.agent_type}) calls no model: nothing to calibrate")
    return Observation(
        agent=estimate.agent,
        route=estimate.model,
        est_prompt=estimate.raw_prompt_tokens,
        est_completion=estimate.raw_completion_tokens,
        actual_prompt=actual_prompt,
        actual_completion=actual_completion,
        est_cost=estimate.cost_usd,
        actual_cost=actual_cost,
    )


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _factor(pairs: Sequence[tuple[int, int]]) -> float:
    ratios = [actual / est for est, actual in pairs if est > 0]
    if not ratios:
        return 1.0
    return min(MAX_FACTOR, max(MIN_FACTOR, _median(ratios)))


def learn_corrections(observations: Sequence[Observation], *, window: int = 50) -> dict[tuple[str, str], Correction]:
    """Per (agent, route): the median ratio actual / uncorrected estimate over the last
    ``window`` observations (oldest first in ``observations``), for prompt and completion
    tokens. The median ignores the odd outlier (a step that failed early, a long tool loop);
    the window follows drift (a changed prompt, a new model version)."""
    if window < 1:
        raise ValueError("window must be at least 1")
    recent: dict[tuple[str, str], deque[Observation]] = {}
    for obs in observations:
        recent.setdefault((obs.agent, obs.route), deque(maxlen=window)).append(obs)
    return {
        key: Correction(
            prompt=_factor([(o.est_prompt, o.actual_prompt) for o in kept]),
            completion=_factor([(o.est_completion, o.actual_completion) for o in kept]),
            samples=len(kept),
        )
        for key, kept in recent.items()
    }


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def error_stats(pairs: Sequence[tuple[float, float]]) -> dict[str, float | int | None]:
    """Relative errors ``|estimate - actual| / actual`` of (estimate, actual) pairs, skipping
    ``actual <= 0``: ``{"count", "p50", "p95", "mean"}`` (None without data), percentiles
    interpolated linearly."""
    errors = sorted(abs(est - act) / act for est, act in pairs if act > 0)
    if not errors:
        return {"count": 0, "p50": None, "p95": None, "mean": None}
    return {
        "count": len(errors),
        "p50": _percentile(errors, 0.50),
        "p95": _percentile(errors, 0.95),
        "mean": sum(errors) / len(errors),
    }


__all__ = [
    "PLANNER_AGENT",
    "UNBOUNDED_COMPLETION_ESTIMATE",
    "UNKNOWN",
    "Correction",
    "CostEnv",
    "ModelPrice",
    "Observation",
    "PlanEstimate",
    "StepEstimate",
    "error_stats",
    "estimate_plan",
    "estimate_step",
    "learn_corrections",
    "model_route",
    "observe",
    "render_preflight",
    "tool_cost_lookup",
]
