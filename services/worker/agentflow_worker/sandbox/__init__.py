"""Sandboxes that run tool code: :class:`ProcessSandbox` (bubblewrap) and :class:`DockerSandbox`."""

from agentflow_worker.sandbox.base import SandboxBackend, SandboxRequest, SandboxResult, SandboxUnavailable
from agentflow_worker.sandbox.docker import DockerSandbox
from agentflow_worker.sandbox.process import ProcessSandbox

__all__ = ["DockerSandbox", "ProcessSandbox", "SandboxBackend", "SandboxRequest", "SandboxResult", "SandboxUnavailable"]
