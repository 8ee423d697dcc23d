"""The sandbox interface: run one program under an :class:`ExecProfile`, contained.

Two backends implement :class:`SandboxBackend`: ``process`` (bubblewrap + rlimits + a pids
limit, :mod:`agentflow_worker.sandbox.process`) and ``docker`` (the Docker SDK,
:mod:`agentflow_worker.sandbox.docker`). Callers never learn which one ran: a breach of a
limit comes back as a :class:`SandboxResult` with ``reason`` set, not as an exception,
so one bad tool call fails its step and the worker goes on serving others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agentflow_core.exec_profile import ExecProfile


class SandboxUnavailable(Exception):
    """The backend cannot run here (bwrap not installed, no Docker engine reachable)."""


@dataclass(frozen=True, slots=True)
class SandboxRequest:
    #: the program and its arguments, as seen inside the sandbox
    argv: list[str]
    stdin: bytes = b""
    #: environment inside the sandbox (secrets the profile grants are added by the caller)
    env: dict[str, str] = field(default_factory=dict)
    #: files written into the sandbox's working directory before the program starts
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SandboxResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_s: float
    #: stdout or stderr hit the profile's output cap (the rest was discarded)
    truncated: bool = False
    #: why the sandbox stopped the program, in plain words ("timed out after 5s",
    #: "memory limit of 256 MB exceeded", "output limit of 1000000 bytes exceeded",
    #: "process limit reached", "killed by signal 9"); None when it exited on its own
    reason: str | None = None


class SandboxBackend(Protocol):
    name: str

    def available(self) -> str | None:
        """None when the backend can run here, else the reason it cannot."""
        ...

    async def run(self, profile: ExecProfile, request: SandboxRequest) -> SandboxResult: ...

    def command(self, profile: ExecProfile, argv: list[str], env: dict[str, str]) -> list[str]:
        """The argv that starts ``argv`` confined by ``profile`` as a long-lived child the
        caller manages itself (stdio MCP servers): same isolation, no wall-clock timeout."""
        ...
