"""The control plane's one settings object, read from ``AGENTFLOW_*`` variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentflow_bus.settings import BusSettings
from agentflow_core.errors import ConfigurationError

#: Accepted only in dev mode; outside it the control plane refuses to start with it.
DEV_JWT_SECRET = "agentflow-dev-secret-do-not-use-in-production"


class DatabaseSettings(BaseSettings):
    """What ``agentflow migrate`` needs, and nothing more."""

    model_config = SettingsConfigDict(env_prefix="AGENTFLOW_", extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/agentflow"


class ControlPlaneSettings(BusSettings, DatabaseSettings):
    dev_mode: bool = False
    jwt_secret: str = ""
    #: PEM public key; when set, RS256 tokens are accepted too.
    jwt_public_key: str = ""
    jwt_algorithms: list[Literal["HS256", "RS256"]] = ["HS256", "RS256"]
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    log_level: str = "info"
    max_body_bytes: int = Field(1_048_576, ge=1024)
    db_pool_size: int = Field(40, ge=1, le=200)
    #: Most results committed in one transaction.
    result_batch_max: int = Field(512, ge=1, le=10_000)
    #: Result batches in flight at once in one process (each its own transaction), so
    #: the engine keeps working while a batch waits on Postgres.
    results_concurrency: int = Field(2, ge=1, le=16)
    #: Outbox rows older than this are published by the relay (a crashed or stalled
    #: process's leftovers); younger ones belong to the process that wrote them.
    outbox_relay_after_s: float = Field(2.0, ge=0.0)
    timer_interval_s: float = Field(0.2, gt=0)
    #: the tools config (tools, MCP servers, tenant policies) shared with the workers
    tools_file: str = ""
    #: a worker whose last heartbeat is older than this is listed as not alive
    worker_dead_after_s: float = Field(15.0, gt=0)
    #: The audit chain and the cost ledger. "off" exists only to measure what they cost
    #: (the benchmark baseline) and is refused outside dev mode.
    governance: Literal["on", "off"] = "on"
    #: How often each tenant's chain head is published to the anchor stream (0: never).
    audit_anchor_interval_s: float = Field(60.0, ge=0)
    #: Prices of models litellm does not know (on-prem), the same table the workers read:
    #: ``{"model": {"input_per_million": $, "output_per_million": $}}``; used for estimates.
    llm_prices: dict[str, dict[str, float]] = Field(default_factory=dict)
    #: How often queued audit entries are sealed into their chains.
    audit_seal_interval_s: float = Field(0.2, gt=0, le=60)
    #: Auth failures are counted and written to the audit chain this often.
    audit_auth_flush_s: float = Field(5.0, gt=0)
    #: Also append every anchor as a JSON line to this file (optional).
    audit_anchor_file: str = ""
    #: How often the queue, worker, budget and audit gauges of /metrics are refreshed
    #: from JetStream and Postgres (0: never; scrapes only read the last values).
    metrics_collect_interval_s: float = Field(5.0, ge=0, le=3600)
    #: Run events are kept this many days for resuming streams and the event history.
    events_retention_days: float = Field(7.0, gt=0, le=3650)
    #: Events buffered per stream connection before a slow client is disconnected
    #: (WebSocket close 4429; it resumes with ``after=`` and loses nothing).
    events_buffer: int = Field(1000, ge=10, le=1_000_000)
    #: Test-only fault injection ("exit_after_commit": exit the process right after the
    #: first run-creating commit, before publishing). Refused outside dev mode.
    fault_inject: str = ""

    @model_validator(mode="after")
    def _secrets(self) -> ControlPlaneSettings:
        if self.dev_mode:
            if not self.jwt_secret:
                self.jwt_secret = DEV_JWT_SECRET
            return self
        if not self.jwt_secret and not self.jwt_public_key:
            raise ConfigurationError("AGENTFLOW_JWT_SECRET (or AGENTFLOW_JWT_PUBLIC_KEY) must be set outside dev mode")
        if self.jwt_secret and (self.jwt_secret == DEV_JWT_SECRET or len(self.jwt_secret) < 32):
            raise ConfigurationError(
                "AGENTFLOW_JWT_SECRET must be a random value of at least 32 characters outside dev mode "
                "(e.g. `openssl rand -hex 32`)"
            )
        if self.fault_inject:
            raise ConfigurationError("AGENTFLOW_FAULT_INJECT is only honoured in dev mode")
        if self.governance == "off":
            raise ConfigurationError(
                "AGENTFLOW_GOVERNANCE=off (no audit chain, no cost ledger) is only honoured in dev mode"
            )
        return self

    @property
    def governance_enabled(self) -> bool:
        return self.governance == "on"

    @property
    def async_database_url(self) -> str:
        return to_async_url(self.database_url)


def to_plain_url(url: str) -> str:
    """The URL asyncpg itself accepts (no SQLAlchemy driver suffix)."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql://{rest}" if sep and scheme.startswith("postgres") else url


def to_async_url(url: str) -> str:
    """SQLAlchemy URL with the asyncpg driver for a plain ``postgresql://`` URL."""
    for plain in (
        "postgresql://",
        "postgres://",
        "postgresql+psycopg://",
        "postgresql+psycopg2://",
    ):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url[len(plain) :]
    return url


@lru_cache(maxsize=1)
def get_settings() -> ControlPlaneSettings:
    return ControlPlaneSettings()
