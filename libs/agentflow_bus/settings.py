"""Settings shared by every AgentFlow process that talks to NATS."""

from __future__ import annotations

import re

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BusSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTFLOW_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    #: Prefix of every subject and stream, so several installations (or test sessions)
    #: can share one NATS server.
    nats_prefix: str = Field("agentflow", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    #: How long a delivered step may go without an ack or heartbeat before JetStream
    #: redelivers it to another worker. Running steps send heartbeats every third of it.
    step_ack_wait_s: float = Field(30.0, gt=0.1, le=3600)
    #: Deliveries of one step message before JetStream gives up on it.
    step_max_deliver: int = Field(10, ge=1, le=1000)
    #: Replicas of the streams (1 for a single NATS server; 3 for a cluster).
    stream_replicas: int = Field(1, ge=1, le=5)


def stream_token(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", prefix).upper()
