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
    #: heartbeat period; the control plane lists a worker as dead after 3 missed beats
    worker_heartbeat_s: float = Field(5.0, gt=0, le=300)
    #: how long SIGTERM waits for running steps before handing them back to JetStream
    worker_drain_timeout_s: float = Field(30.0, ge=0, le=3600)
    log_level: str = "info"

    #: tools, MCP servers, tenant policies and sandbox ceilings (shared with the control plane)
    tools_file: str = ""
    #: named secrets: ``<dir>/<tenant>/<NAME>`` and ``<dir>/_shared/<NAME>`` (plus AGENTFLOW_SECRET_<NAME>)
    secrets_dir: str = ""
    #: storage agents' per-tenant workspaces live under this directory
    workspace_dir: str = "./agentflow-workspace"
    #: database agent connections, name -> DSN (JSON in AGENTFLOW_DATABASES); DSNs can
    #: also come from the secret DB_<NAME>
    databases: dict[str, str] = Field(default_factory=dict)
    #: prices of models litellm does not know: JSON {"model": {"input_per_million": 0.2,
    #: "output_per_million": 0.6}}
    llm_prices: dict[str, dict[str, float]] = Field(default_factory=dict)
    #: the docker sandbox: image and OCI runtime ("runsc" for gVisor; "" = engine default)
    docker_image: str = "python:3.11-slim"
    docker_runtime: str = ""
