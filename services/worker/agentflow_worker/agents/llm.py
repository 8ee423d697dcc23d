"""``llm``: one conversation with a language model, through litellm.

What a step does, in order (settings: :class:`agentflow_core.agent_configs.llm.LlmAgentConfig`):

1. resolve ``system``/``prompt`` (templates or ``prompt:``/``file:``/``yaml:`` references,
   see :mod:`.llm_prompts`) and fill them from the step;
2. resolve the listed tools through the tool runtime (deny by default, tenant policy);
3. call the model — retrying 429/5xx/connection errors/timeouts with backoff (honoring
   ``Retry-After``), then each fallback model in order — after checking the step's
   budget against an estimate of the call;
4. while the model asks for tools (up to ``max_iterations`` rounds), run each call
   through :meth:`ToolRuntime.call` and hand it the results;
5. with ``output_schema``, parse and validate the answer, with one repair round.

Every call's tokens and cost go to ``ctx.meter`` (the result envelope's ``usage``).

litellm is imported on the first LLM step, never at worker start (see
:func:`.llm_pricing.litellm_module`). Calls with ``tools=`` need the ``mcp`` package
installed: litellm imports it on that code path.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from agentflow_core.agent_configs.llm import LlmAgentConfig, ModelSettings
from agentflow_core.exec_profile import ToolDenied
from agentflow_core.tools import function_name_to_tool_id, schema_errors, tool_as_function
from agentflow_worker.agents.base import AgentError, LlmUsage, StepContext, parse_config
from agentflow_worker.agents.llm_pricing import (
    call_cost,
    cost_of,
    count_prompt_tokens,
    count_text_tokens,
    litellm_if_loaded,
    litellm_module,
)
from agentflow_worker.agents.llm_prompts import render_setting
from agentflow_worker.services import WorkerServices
from agentflow_worker.tracing import llm_call, llm_usage

log = logging.getLogger("agentflow.llm")

#: a server asking for a longer pause than this gets this much (the step has a timeout too)
RETRY_AFTER_CAP_S = 60.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
#: 408 request timeout, 409 conflict (OpenAI: "try again"), 429 rate limited; and all 5xx
RETRYABLE_STATUS = frozenset({408, 409, 429})
#: completion tokens assumed by the budget estimate when ``max_tokens`` is not set
UNBOUNDED_COMPLETION_ESTIMATE = 4096
#: streamed text is forwarded in pieces of at most this age / at least this size
FLUSH_INTERVAL_S = 0.05
FLUSH_CHARS = 200

_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```", re.DOTALL)
_LITELLM_PREFIX = re.compile(r"^(?:litellm\.)?[A-Za-z_]+(?:Error|Exception|Timeout)(?:: | - )")
_LITELLM_NOISE = re.compile(r" ssl:<[^>]*>|\s*Handle with `litellm\.[A-Za-z]+`\.?|\s*Received Model Group=.*$")


def model_route(model: ModelSettings) -> str:
    """litellm's ``provider/model`` (``openai/gpt-4o``, ``hosted_vllm/meta-llama/...``)."""
    prefix = f"{model.provider}/"
    return model.model if model.model.startswith(prefix) else prefix + model.model


def strip_fences(text: str) -> str:
    """The JSON inside a Markdown code fence, if the answer has one; else the text."""
    stripped = text.strip()
    if stripped.startswith("```"):
        match = _FENCE.match(stripped)
        if match:
            return match.group(1).strip()
    match = _FENCE.search(stripped)
    if match and not stripped.startswith(("{", "[")):
        return match.group(1).strip()
    return stripped


def parse_answer(text: str, schema: dict[str, Any]) -> tuple[Any, list[str]]:
    """(value, problems): the answer parsed as JSON and checked against ``schema``."""
    try:
        value = json.loads(strip_fences(text))
    except json.JSONDecodeError as exc:
        return None, [f"(root): not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
    return value, schema_errors(schema, value)


def retry_after_s(exc: BaseException, now: float | None = None) -> float | None:
    """The pause a provider asked for: ``retry-after-ms``, ``Retry-After`` in seconds or as
    an HTTP date. litellm puts the provider's headers on ``exc.litellm_response_headers``
    (its ``exc.response`` is a synthetic response with no headers)."""
    for source in (
        getattr(exc, "litellm_response_headers", None),
        getattr(getattr(exc, "response", None), "headers", None),
    ):
        if not source:
            continue
        try:
            headers = {str(k).lower(): str(v) for k, v in dict(source).items()}
        except (TypeError, ValueError):
            continue
        if "retry-after-ms" in headers:
            try:
                return max(0.0, float(headers["retry-after-ms"]) / 1000)
            except ValueError:
                pass
        value = headers.get("retry-after")
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            continue
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


def backoff_s(attempt: int, hinted: float | None) -> float:
    if hinted is not None:
        return min(hinted, RETRY_AFTER_CAP_S)
    # Exponential with jitter, so workers hit by the same outage do not retry in step.
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * (1 << min(attempt, 30))) * random.uniform(0.5, 1.0)


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _missing_key(exc: BaseException) -> bool:
    # The OpenAI client refuses to send a request without a key; litellm reports that as
    # an HTTP 500 "InternalServerError". Retrying a configuration mistake only wastes time.
    return "Missing credentials" in str(exc)


def _retryable(exc: BaseException, litellm: Any) -> bool:
    if _missing_key(exc):
        return False
    if isinstance(exc, (litellm.Timeout, litellm.APIConnectionError, litellm.RateLimitError)):
        return True
    status = _status(exc)
    if status is None:
        # Transport errors that escaped litellm's mapping: the network, not the request.
        return isinstance(exc, OSError)  # ConnectionError, TimeoutError and kin
    return status in RETRYABLE_STATUS or status >= 500


#: providers spoken through the OpenAI client, where an on-prem server needs no real key
KEYLESS_OK = frozenset(
    {"openai", "hosted_vllm", "openai_compatible", "text-completion-openai", "lm_studio", "llamafile"}
)


def _describe(exc: BaseException, litellm: Any, timeout_s: float) -> str:
    """What went wrong, short: the provider's message without litellm's decorations."""
    if isinstance(exc, (litellm.Timeout, TimeoutError)):
        return f"timed out (no answer within timeout_s {timeout_s:g}s)"
    if _missing_key(exc):
        return "no API key: set model.api_key_secret (or the provider's key variable on the worker)"
    message = str(getattr(exc, "message", None) or exc) or type(exc).__name__
    previous = None
    while previous != message:
        previous, message = message, _LITELLM_PREFIX.sub("", message, count=1)
    message = _LITELLM_NOISE.sub("", message)
    message = " ".join(message.split())
    if len(message) > 300:
        message = message[:297] + "..."
    status = _status(exc)
    # litellm reports an unreachable server as status 500 too; only a real HTTP answer
    # comes with the provider's response headers.
    if isinstance(exc, litellm.APIConnectionError) or (
        status is not None and getattr(exc, "litellm_response_headers", None) is None and status >= 500
    ):
        return f"cannot reach the model server: {message}"
    return f"HTTP {status}: {message}" if status else f"{type(exc).__name__}: {message}"


def _usd(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


class _ModelFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class _Answer:
    content: str | None
    tool_calls: list[_ToolCall]


@dataclass
class _Conversation:
    """One step's calls: which model is current, what failed, what it all cost."""

    ctx: StepContext
    config: LlmAgentConfig
    services: WorkerServices
    litellm: Any
    models: list[ModelSettings]
    current: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    used_route: str = ""
    stream_events: int = 0

    async def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], json_mode: bool) -> _Answer:
        """One model answer: the current model with its retries, then the fallbacks. A
        model that failed stays skipped for the rest of the step."""
        while self.current < len(self.models):
            settings = self.models[self.current]
            route = model_route(settings)
            try:
                answer = await self._with_retries(settings, route, messages, tools, json_mode)
            except _ModelFailed as exc:
                self.failures[route] = exc.message
                self.current += 1
                if self.current < len(self.models):
                    log.warning(
                        "model %s failed (%s); falling back to %s",
                        route,
                        exc.message,
                        model_route(self.models[self.current]),
                    )
                continue
            self.used_route = route
            return answer
        tried = "; ".join(f"{route}: {error}" for route, error in self.failures.items())
        if len(self.failures) == 1:
            raise AgentError(f"model {tried}")
        raise AgentError(f"all {len(self.failures)} models failed: {tried}")

    async def _with_retries(
        self,
        settings: ModelSettings,
        route: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        json_mode: bool,
    ) -> _Answer:
        kwargs: dict[str, Any] = {
            "model": route,
            "temperature": settings.temperature,
            "timeout": settings.timeout_s,
            # Retries are ours (they honor Retry-After and move on to fallbacks): none
            # inside litellm, none inside the OpenAI client it wraps.
            "num_retries": 0,
            "max_retries": 0,
            # A provider without e.g. response_format support gets the call without it,
            # rather than a refusal; the answer is validated here anyway.
            "drop_params": True,
        }
        if settings.max_tokens is not None:
            kwargs["max_tokens"] = settings.max_tokens
        if settings.api_base:
            kwargs["api_base"] = settings.api_base
        if settings.api_key_secret:
            # MissingSecret (an AgentError naming the secret) fails the step: a
            # configuration mistake, not an outage a fallback should paper over.
            kwargs["api_key"] = self.services.secrets.get(self.ctx.tenant, settings.api_key_secret)
        elif settings.api_base and settings.provider in KEYLESS_OK and not os.environ.get("OPENAI_API_KEY"):
            # On-prem OpenAI-compatible servers (vLLM, TGI, llama.cpp) usually want no
            # key, but the OpenAI client refuses to send a request without one.
            kwargs["api_key"] = "EMPTY"
        if tools:
            kwargs["tools"] = tools
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            await self._check_budget(settings, route, messages, tools)
            try:
                with llm_call(settings.provider, settings.model, route, attempt + 1):
                    if self.config.stream:
                        return await self._streamed(settings, route, messages, kwargs)
                    response = await self.litellm.acompletion(messages=messages, **kwargs)
                    return self._answer(settings, route, messages, response)
            except (AgentError, _ModelFailed, asyncio.CancelledError):
                raise
            except Exception as exc:
                description = _describe(exc, self.litellm, settings.timeout_s)
                if not _retryable(exc, self.litellm):
                    raise _ModelFailed(description) from None
                if attempt + 1 >= attempts:
                    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
                    raise _ModelFailed(description + tries) from None
                delay = backoff_s(attempt, retry_after_s(exc))
                log.info("model %s: %s; retry %d/%d in %.2fs", route, description, attempt + 1, attempts - 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _check_budget(
        self, settings: ModelSettings, route: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> None:
        config, gate, ctx = self.config, self.services.budget, self.ctx
        if (
            config.max_cost_usd is None
            and config.max_total_tokens is None
            and gate is None
            and ctx.budget_usd is None
            and ctx.budget_tokens is None
        ):
            return
        prompt = count_prompt_tokens(route, messages, tools)
        completion = settings.max_tokens or UNBOUNDED_COMPLETION_ESTIMATE
        tokens = prompt + completion
        cost, _ = cost_of(route, settings.model, prompt, completion, self.services.llm_prices)
        meter = ctx.meter
        if config.max_total_tokens is not None and meter.total_tokens + tokens > config.max_total_tokens:
            raise AgentError(
                f"budget: this call may use up to {tokens} tokens ({prompt} prompt + {completion} max_tokens); "
                f"step used {meter.total_tokens} of max_total_tokens {config.max_total_tokens}"
            )
        if config.max_cost_usd is not None and meter.cost_usd + cost > config.max_cost_usd:
            raise AgentError(
                f"budget: this call may cost up to ${_usd(cost)} ({route}, {prompt} prompt + {completion} max_tokens); "
                f"step spent ${_usd(meter.cost_usd)} of max_cost_usd ${_usd(config.max_cost_usd)}"
            )
        # The control plane reserved only this much for the attempt: a call that could
        # spend past it is never made, whatever the agent's own limits allow.
        if ctx.budget_tokens is not None and meter.total_tokens + tokens > ctx.budget_tokens:
            raise AgentError(
                f"budget_exceeded: this call may use up to {tokens} tokens "
                f"({prompt} prompt + {completion} max_tokens); "
                f"the step's budget reservation is {ctx.budget_tokens} tokens (used {meter.total_tokens})"
            )
        if ctx.budget_usd is not None and meter.cost_usd + cost > ctx.budget_usd:
            raise AgentError(
                f"budget_exceeded: this call may cost up to ${_usd(cost)} ({route}, {prompt} prompt + {completion} "
                f"max_tokens); the step's budget reservation is ${_usd(ctx.budget_usd)} (spent ${_usd(meter.cost_usd)})"
            )
        if gate is not None:
            await gate.before_llm_call(ctx.tenant, ctx.run, ctx.step, cost, tokens)

    def _answer(self, settings: ModelSettings, route: str, messages: list[dict[str, Any]], response: Any) -> _Answer:
        choices = getattr(response, "choices", None) or []
        if not choices:
            raise _ModelFailed("the model returned no answer (no choices)")
        message = choices[0].message
        calls = [
            _ToolCall(
                id=str(getattr(call, "id", None) or f"call_{i}"),
                name=str(call.function.name or ""),
                arguments=str(call.function.arguments or ""),
            )
            for i, call in enumerate(getattr(message, "tool_calls", None) or [])
        ]
        content = getattr(message, "content", None)
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        if prompt == 0 and completion == 0:
            # No usage reported (some servers, streams without the usage chunk): count.
            prompt = count_prompt_tokens(route, messages)
            completion = count_text_tokens(route, (content or "") + "".join(c.name + c.arguments for c in calls))
        self._record(settings, route, prompt, completion)
        return _Answer(content, calls)

    def _record(self, settings: ModelSettings, route: str, prompt: int, completion: int) -> None:
        cost, source = call_cost(route, settings.model, prompt, completion, self.services.llm_prices)
        self.ctx.meter.llm_calls.append(LlmUsage(route, prompt, completion, cost, source))
        llm_usage(route, prompt, completion, cost, source)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost_usd += cost

    async def _streamed(
        self, settings: ModelSettings, route: str, messages: list[dict[str, Any]], kwargs: dict[str, Any]
    ) -> _Answer:
        """Forward text deltas as ``token`` progress events, coalesced so that a fast model
        does not send one NATS message per token; assemble the answer (tool-call deltas
        included) with litellm's chunk builder. A stream that fails midway is retried
        from the start; its deltas were already forwarded, the events' ``index`` keeps
        counting."""
        ctx = self.ctx
        stream = await self.litellm.acompletion(
            messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
        )
        chunks: list[Any] = []
        pending: list[str] = []
        pending_chars = 0
        last_flush = time.monotonic()

        async def flush() -> None:
            nonlocal pending, pending_chars, last_flush
            last_flush = time.monotonic()
            if not pending:
                return
            text, pending, pending_chars = "".join(pending), [], 0
            await self.services.progress.emit(
                ctx.tenant, ctx.run, ctx.step, ctx.attempt, "token", {"delta": text, "index": self.stream_events}
            )
            self.stream_events += 1

        try:
            async for chunk in stream:
                chunks.append(chunk)
                choices = getattr(chunk, "choices", None) or []
                text = getattr(choices[0].delta, "content", None) if choices else None
                if text:
                    pending.append(text)
                    pending_chars += len(text)
                    if pending_chars >= FLUSH_CHARS or time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                        await flush()
            await flush()
        finally:
            # A cancelled step or a failed stream must not keep the HTTP connection open.
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        if not chunks:
            raise _ModelFailed("the model's stream ended without any answer")
        built = self.litellm.stream_chunk_builder(chunks, messages=messages)
        if built is None:
            raise _ModelFailed("the model's stream could not be assembled into an answer")
        return self._answer(settings, route, messages, built)


class LlmAgent:
    async def run(self, ctx: StepContext) -> Any:
        config = parse_config(LlmAgentConfig, ctx)
        services = ctx.services or WorkerServices()
        # Prompt mistakes fail before the (slow, first-time) litellm import.
        system = render_setting(config.system, ctx, f"agent '{ctx.agent_name}' system") if config.system else None
        prompt = render_setting(config.prompt, ctx, f"agent '{ctx.agent_name}' prompt")
        # The first import takes seconds: off the event loop, so heartbeats keep flowing.
        litellm = litellm_if_loaded() or await asyncio.to_thread(litellm_module)
        models = [config.model, *config.fallback_models]
        for settings in models:
            if settings.provider not in litellm.provider_list:
                raise AgentError(
                    f"agent '{ctx.agent_name}': provider '{settings.provider}' is not one litellm knows "
                    f"(e.g. openai, anthropic, gemini, ollama, hosted_vllm; use openai with api_base for "
                    f"other OpenAI-compatible servers)"
                )
        schema = config.output_schema
        if schema is not None:
            instruction = (
                "Answer with only a JSON value (no prose, no code fences) that satisfies this JSON Schema:\n"
                + json.dumps(schema, ensure_ascii=False)
            )
            system = f"{system}\n\n{instruction}" if system else instruction
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})

        functions: list[dict[str, Any]] = []
        if config.tools:
            if services.tools is None:
                raise AgentError(f"agent '{ctx.agent_name}' lists tools, but this worker has no tool runtime")
            try:
                specs = await services.tools.resolve(ctx, config.tools)
            except ToolDenied as exc:
                raise AgentError(exc.message) from exc
            functions = [tool_as_function(spec) for spec in specs]

        # json_object mode makes the model emit an object; a schema asking for anything
        # else (an array) is left to the instruction and the validation.
        json_mode = schema is not None and schema.get("type", "object") == "object"
        talk = _Conversation(ctx, config, services, litellm, models)
        rounds = 0
        calls_made = 0
        repaired = False
        while True:
            answer = await talk.complete(messages, functions, json_mode)
            if answer.tool_calls and functions:
                if rounds >= config.max_iterations:
                    raise AgentError(f"tool loop did not finish within {config.max_iterations} iterations")
                rounds += 1
                messages.append(_assistant_with_calls(answer))
                for call in answer.tool_calls:
                    calls_made += 1
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": call.id,
                            "content": await _run_tool(ctx, services, config, call),
                        }
                    )
                continue
            text = answer.content or ""
            if schema is None:
                return {
                    "content": text,
                    "model": talk.used_route,
                    "usage": {
                        "prompt_tokens": talk.prompt_tokens,
                        "completion_tokens": talk.completion_tokens,
                        "cost_usd": round(talk.cost_usd, 10),
                    },
                    "tool_calls": calls_made,
                }
            value, problems = parse_answer(text, schema)
            if not problems:
                return value
            if repaired:
                raise AgentError("answer does not match output_schema after 1 repair: " + "; ".join(problems))
            repaired = True
            messages.append({"role": "assistant", "content": text})
            messages.append(
                {
                    "role": "user",
                    "content": "Your answer does not satisfy the required JSON Schema:\n- "
                    + "\n- ".join(problems)
                    + "\nReply again with only the corrected JSON value, nothing else.",
                }
            )


def _assistant_with_calls(answer: _Answer) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": answer.content,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in answer.tool_calls
        ],
    }


async def _run_tool(ctx: StepContext, services: WorkerServices, config: LlmAgentConfig, call: _ToolCall) -> str:
    """The tool message content: the output as JSON, or ``error: why`` for the model to
    read (a failed or refused call is the model's problem to handle, not the step's)."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return (
            f"error: the arguments of {call.name} are not valid JSON ({exc.msg} at position {exc.pos}); "
            "the tool was not called"
        )
    assert services.tools is not None
    outcome = await services.tools.call(ctx, function_name_to_tool_id(call.name), arguments, allowed=config.tools)
    if not outcome.ok:
        return f"error: {outcome.error}"
    return json.dumps(outcome.output, ensure_ascii=False, default=str)


LLM_AGENTS = {"llm": LlmAgent()}
