"""Settings of the ``http`` agent."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentflow_core.tools import check_hosts


class HttpAgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: may hold ``{input.field}`` placeholders (filled and URL-quoted from the step)
    url: str = Field(min_length=1, max_length=8192)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    #: hosts the URL may resolve to after templating (deny by default: must list the URL's host)
    allowed_hosts: list[str] = Field(min_length=1, max_length=100)
    headers: dict[str, str] = Field(default_factory=dict)
    #: header name -> secret name (``Authorization: API_TOKEN`` sends the secret's value)
    secret_headers: dict[str, str] = Field(default_factory=dict)
    #: JSON body; default: the step input for POST/PUT/PATCH
    body: Any = None
    query: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(30.0, gt=0, le=3600)
    connect_timeout_s: float = Field(10.0, gt=0, le=600)
    max_response_bytes: int = Field(10_000_000, ge=1, le=1_000_000_000)
    max_request_bytes: int = Field(10_000_000, ge=1, le=1_000_000_000)
    retries: int = Field(2, ge=0, le=20)
    backoff_ms: int = Field(200, ge=0, le=600_000)
    #: statuses that fail the step (others succeed with the status in the output)
    fail_on_status: list[int] = Field(default_factory=lambda: list(range(400, 600)))
    follow_redirects: bool = False

    _hosts = field_validator("allowed_hosts")(check_hosts)
