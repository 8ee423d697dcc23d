"""``llm_plan``: the guarded LLM planner's planning call, run on a worker.

The control plane never talks to a model (it stays pure and does no network I/O); it
dispatches this step with the prompt messages, and validates the answer itself. The
call goes to an OpenAI-compatible ``/chat/completions`` endpoint (``model.api_base``);
the API key comes from the worker's environment variable named by ``model.api_key_env``.

This is a minimal client for the planner only; the general LLM agent (litellm, provider
fallbacks, streaming, costs) belongs to the worker-runtime issue.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from agentflow_worker.agents.base import AgentError, StepContext

DEFAULT_API_BASE = "https://api.openai.com/v1"


class LlmPlanAgent:
    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0))
        return self._client

    async def run(self, ctx: StepContext) -> Any:
        model = ctx.payload.get("model") or ctx.config.get("model")
        messages = ctx.payload.get("messages")
        if not isinstance(model, dict) or not isinstance(messages, list):
            raise AgentError("planning step needs 'model' settings and 'messages'")
        base = str(model.get("api_base") or DEFAULT_API_BASE).rstrip("/")
        headers = {"Content-Type": "application/json"}
        key_env = model.get("api_key_env")
        if key_env:
            key = os.environ.get(str(key_env))
            if not key:
                raise AgentError(f"environment variable {key_env} (model.api_key_env) is not set on the worker")
            headers["Authorization"] = f"Bearer {key}"
        body: dict[str, Any] = {
            "model": model["model"],
            "messages": messages,
            "temperature": model.get("temperature", 0.0),
            "max_tokens": model.get("max_tokens", 2048),
        }
        if ctx.payload.get("response_format") == "json":
            body["response_format"] = {"type": "json_object"}
        try:
            response = await self._http().post(f"{base}/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise AgentError(f"planning call to {base} failed: {exc}") from exc
        if response.status_code != 200:
            # 429 and 5xx fail the attempt; the engine retries it with backoff.
            raise AgentError(f"planning call returned HTTP {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise AgentError(f"planning call returned an unexpected body: {response.text[:300]}") from exc
        return {"content": content, "usage": data.get("usage") or {}, "model": data.get("model", model["model"])}
