"""Builds a worker's :class:`WorkerServices` from its settings: one place, at start-up."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from agentflow_bus.kv import ensure_bucket
from agentflow_bus.subjects import Names
from agentflow_core.exec_profile import ExecProfileCompiler
from agentflow_core.tools_config import ToolsConfig, load_tools_config
from agentflow_worker.progress import NatsProgress
from agentflow_worker.sandbox.base import SandboxBackend
from agentflow_worker.secrets import SecretStore
from agentflow_worker.services import WorkerServices
from agentflow_worker.settings import WorkerSettings
from agentflow_worker.tools.ratelimit import KvRateLimiter
from agentflow_worker.tools.runtime import ToolHandlerImpl, ToolRuntime

log = logging.getLogger("agentflow.worker")

#: longest rate-limit period we promise to honour: GCRA state lives at most this long
RATE_STATE_TTL_S = 2 * 86_400


def sandbox_backends(settings: WorkerSettings) -> dict[str, SandboxBackend]:
    from agentflow_worker.sandbox.docker import DockerSandbox
    from agentflow_worker.sandbox.process import ProcessSandbox

    process = ProcessSandbox()
    docker = DockerSandbox(image=settings.docker_image, runtime=settings.docker_runtime or None)
    gvisor = DockerSandbox(image=settings.docker_image, runtime="runsc")
    log.info("process sandbox: %s", process.describe())
    return {"process": process, "docker": docker, "gvisor": gvisor}


def tool_runtime(
    config: ToolsConfig,
    settings: WorkerSettings,
    secrets: SecretStore,
    limiter: KvRateLimiter | None,
    services: WorkerServices,
) -> ToolRuntime:
    from agentflow_worker.tools.sandboxed import CodeExecutorHandler, CommandToolHandler

    backends = sandbox_backends(settings)
    for name, backend in backends.items():
        reason = backend.available()
        if reason:
            log.info("sandbox '%s' unavailable here: %s", name, reason)
    handlers: dict[str, ToolHandlerImpl] = {
        "code_executor": CodeExecutorHandler(backends),
        "command": CommandToolHandler(backends),
    }
    mcp = None
    if config.mcp.enabled:
        from agentflow_worker.tools.mcp import McpManager, McpToolHandler

        mcp = McpManager(
            config.mcp,
            sandbox=backends["process"],
            compiler=ExecProfileCompiler(config.tool_security),
            secrets=secrets,
        )
        handlers["mcp"] = McpToolHandler(mcp)
        services.closers.append(mcp.close)
    return ToolRuntime(config, handlers, secrets=secrets, limiter=limiter, mcp=mcp)


def _absolute(path: str) -> Path:
    # Fixed at start-up: a later chdir must not move every tenant's workspace.
    return Path(os.path.abspath(path))


async def build_services(settings: WorkerSettings, nc: Client, js: JetStreamContext, names: Names) -> WorkerServices:
    secrets = SecretStore(settings.secrets_dir or None)
    services = WorkerServices(
        secrets=secrets,
        progress=NatsProgress(nc, names),
        workspace_root=_absolute(settings.workspace_dir),
        databases=dict(settings.databases),
        llm_prices=dict(settings.llm_prices),
    )
    config = load_tools_config(settings.tools_file)
    kv = await ensure_bucket(js, names.rate_limit_bucket, ttl_s=RATE_STATE_TTL_S, replicas=settings.stream_replicas)
    services.tools = tool_runtime(config, settings, secrets, KvRateLimiter(kv), services)
    return services
