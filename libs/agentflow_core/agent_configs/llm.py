"""Settings of the ``llm`` agent (litellm on the worker)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentflow_core.tools import check_json_schema


class ModelSettings(BaseModel):
    """One model: ``provider`` + ``model`` become litellm's ``provider/model``.

    On-prem servers (vLLM, Ollama, TGI, anything OpenAI-compatible) use their provider
    name or ``openai`` with ``api_base``. The API key is a named secret, never inline.
    """

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int | None = Field(1024, ge=1, le=1_000_000)
    api_base: str | None = Field(None, max_length=2048)
    #: name of the secret holding the API key (see the worker's secret store)
    api_key_secret: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    timeout_s: float = Field(120.0, gt=0, le=3600)


class LlmAgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSettings
    #: tried in order when the primary model fails after its retries
    fallback_models: list[ModelSettings] = Field(default_factory=list, max_length=10)
    #: system message: a template, or a reference ``prompt:NAME``, ``file:path``, ``yaml:path#key``
    system: str | None = Field(None, max_length=200_000)
    #: user message, same forms as ``system``; fields like ``{input.text}`` are filled from the step
    prompt: str = Field(min_length=1, max_length=200_000)
    #: JSON Schema the answer must satisfy (the answer is parsed as JSON)
    output_schema: dict[str, Any] | None = None
    #: registry tool ids the model may call (deny by default: none)
    tools: list[str] = Field(default_factory=list, max_length=100)
    max_iterations: int = Field(8, ge=1, le=100)
    stream: bool = False
    #: retries of one model call on 429/5xx/connection errors, honoring Retry-After
    max_retries: int = Field(3, ge=0, le=20)
    #: per-step spend ceiling checked before each model call (budgets proper come later)
    max_cost_usd: float | None = Field(None, ge=0)
    max_total_tokens: int | None = Field(None, ge=1)

    @field_validator("output_schema")
    @classmethod
    def _schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if schema is None else check_json_schema(schema)
