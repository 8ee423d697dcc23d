"""Handlers of tools that run code in a sandbox: the built-in ``code_executor`` and ``command`` tools.

Both pick the sandbox backend by the call's :attr:`ExecProfile.runtime` from the backends
the worker was built with, e.g.::

    backends = {"process": ProcessSandbox(), "docker": DockerSandbox(), "gvisor": DockerSandbox(runtime="runsc")}

They differ in what a failure is:

* ``code_executor`` shows the model what happened: a non-zero exit or a contained program
  (``reason`` set: timeout, memory, CPU, processes, output) is a *result*
  (``{"stdout", "stderr", "exit_code", "truncated", "reason"}``), not an exception;
* a ``command`` tool is a program with a JSON contract (input on stdin, output on
  stdout): a non-zero exit, a containment or output that is not JSON raise
  :class:`ToolFailure` with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agentflow_core.exec_profile import ExecProfile
from agentflow_core.tools import CodeExecutorHandler as CodeExecutorSpec
from agentflow_core.tools import CommandHandler as CommandSpec
from agentflow_core.tools import ToolSpec
from agentflow_worker.sandbox.base import SandboxBackend, SandboxRequest, SandboxResult, SandboxUnavailable
from agentflow_worker.tools.errors import ToolFailure
from agentflow_worker.tracing import traced_sandbox

#: Linux's limit on one argument (MAX_ARG_STRLEN); code passed with ``-c`` must fit
_MAX_ARG = 128 * 1024 - 1
_STDERR_TAIL = 2000


def base_env(profile: ExecProfile, env: Mapping[str, str]) -> dict[str, str]:
    """What a sandboxed program finds in its environment: a PATH, a UTF-8 locale, a HOME
    it may write to when it may write at all, and the secrets granted (``env``). Nothing
    of the worker's own environment."""
    out = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/tmp" if profile.filesystem == "tmp" else "/",
    }
    out.update(env)
    return out


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class _Sandboxed:
    def __init__(self, backends: Mapping[str, SandboxBackend]) -> None:
        self.backends = dict(backends)

    def backend(self, spec: ToolSpec, profile: ExecProfile) -> SandboxBackend:
        backend = self.backends.get(profile.runtime)
        if backend is None:
            configured = ", ".join(sorted(self.backends)) or "none"
            raise ToolFailure(
                f"tool '{spec.id}' must run in the '{profile.runtime}' sandbox, which this worker does not have "
                f"(configured: {configured})"
            )
        return backend

    @traced_sandbox
    async def run(self, spec: ToolSpec, profile: ExecProfile, request: SandboxRequest) -> SandboxResult:
        backend = self.backend(spec, profile)
        problem = backend.available()
        if problem:
            raise ToolFailure(f"tool '{spec.id}' cannot run: the {backend.name} sandbox is unavailable: {problem}")
        try:
            return await backend.run(profile, request)
        except SandboxUnavailable as exc:
            raise ToolFailure(f"tool '{spec.id}' cannot run: the {backend.name} sandbox is unavailable: {exc}") from exc
        except ValueError as exc:  # a request the sandbox refuses (bad file name, files without a filesystem)
            raise ToolFailure(f"tool '{spec.id}': {exc}") from exc


class CodeExecutorHandler(_Sandboxed):
    """Runs ``{"language": "python"|"bash", "code": ..., "stdin"?: ...}`` in the sandbox."""

    async def invoke(self, spec: ToolSpec, profile: ExecProfile, arguments: dict[str, Any], env: dict[str, str]) -> Any:
        handler = spec.handler
        if not isinstance(handler, CodeExecutorSpec):
            raise ToolFailure(f"tool '{spec.id}' is not a code_executor tool (handler kind '{handler.kind}')")
        language = arguments.get("language")
        code = arguments.get("code")
        stdin = arguments.get("stdin") or ""
        if language not in handler.languages:
            enabled = ", ".join(handler.languages)
            raise ToolFailure(f"tool '{spec.id}': language {language!r} is not enabled (enabled: {enabled})")
        if not isinstance(code, str):
            raise ToolFailure(f"tool '{spec.id}': 'code' must be a string")
        if not isinstance(stdin, str):
            raise ToolFailure(f"tool '{spec.id}': 'stdin' must be a string")
        backend = self.backend(spec, profile)
        source = code.encode()
        # A file gives tracebacks with source lines; a backend that cannot place files
        # without a filesystem grant gets the code as an argument instead.
        if profile.filesystem != "none" or getattr(backend, "files_without_filesystem", False):
            name = "main.py" if language == "python" else "main.sh"
            files, program = {name: source}, [name]
        elif len(source) <= _MAX_ARG:
            files, program = {}, ["-c", code]
        else:
            raise ToolFailure(
                f"tool '{spec.id}': {len(source)} bytes of code do not fit in one argument and the "
                f"'{profile.filesystem}' filesystem grant leaves no place for a file"
            )
        if language == "python":
            interpreter = getattr(backend, "python", "python3")
            argv = [interpreter, "-I", *program]
        else:
            argv = ["/bin/bash", *program]
        result = await self.run(
            spec, profile, SandboxRequest(argv=argv, stdin=stdin.encode(), env=base_env(profile, env), files=files)
        )
        return {
            "stdout": _text(result.stdout),
            "stderr": _text(result.stderr),
            "exit_code": result.exit_code,
            "truncated": result.truncated,
            "reason": result.reason,
        }


class CommandToolHandler(_Sandboxed):
    """Runs the spec's ``argv`` with the tool input as JSON on stdin; stdout must be JSON."""

    async def invoke(self, spec: ToolSpec, profile: ExecProfile, arguments: dict[str, Any], env: dict[str, str]) -> Any:
        handler = spec.handler
        if not isinstance(handler, CommandSpec):
            raise ToolFailure(f"tool '{spec.id}' is not a command tool (handler kind '{handler.kind}')")
        stdin = json.dumps(arguments, ensure_ascii=False).encode()
        result = await self.run(
            spec, profile, SandboxRequest(argv=list(handler.argv), stdin=stdin, env=base_env(profile, env))
        )
        stderr = _text(result.stderr[-_STDERR_TAIL:]).strip()
        detail = f"; stderr: {stderr}" if stderr else ""
        if result.reason:
            raise ToolFailure(f"command tool '{spec.id}' was stopped: {result.reason}{detail}")
        if result.exit_code != 0:
            raise ToolFailure(f"command tool '{spec.id}' exited with code {result.exit_code}{detail}")
        try:
            return json.loads(result.stdout)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            shown = _text(result.stdout[:200])
            raise ToolFailure(
                f"command tool '{spec.id}' printed no JSON: {exc} (stdout began with {shown!r}){detail}"
            ) from exc
