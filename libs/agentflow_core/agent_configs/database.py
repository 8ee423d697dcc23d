"""Settings of the ``database`` agent."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DatabaseAgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: a connection configured on the worker (``AGENTFLOW_DATABASES`` / secret ``DB_<NAME>``)
    connection: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    #: SQL with ``$1, $2, ...`` placeholders; values never go into the text
    query: str = Field(min_length=1, max_length=100_000)
    #: values for the placeholders: literals, or ``{input.field}`` references to the step
    params: list[Any] = Field(default_factory=list, max_length=1000)
    read_only: bool = True
    max_rows: int = Field(1000, ge=1, le=1_000_000)
    timeout_s: float = Field(30.0, gt=0, le=3600)
