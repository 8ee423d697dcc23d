"""The worker's one settings object, read from ``AGENTFLOW_*`` variables."""

from __future__ import annotations

import os
import socket

from pydantic import Field

from agentflow_bus.settings import BusSettings


class WorkerSettings(BusSettings):
    worker_queue: str = Field("default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    worker_concurrency: int = Field(64, ge=1, le=10_000)
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    #: A step still running after this long is reported as started (shown as
    #: ``running``); quicker steps skip the notice and go straight to their result,
    #: which halves the messages per step on the hot path. 0 = always report.
    worker_started_notice_ms: int = Field(20, ge=0)
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    log_level: str = "info"
