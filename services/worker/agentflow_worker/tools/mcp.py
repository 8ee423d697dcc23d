"""MCP servers as tool sources: discovery (``tools/list``) and calls (``tools/call``).

:class:`McpManager` keeps **one session per configured server per worker**, opened on
first use (the SDK's ``Client``: ``server/discover`` or the ``initialize`` handshake), kept
open and shared by every step and tenant the worker serves. A session whose connection
dropped (the server process died, the HTTP server went away) is replaced on the next use;
a request that fails because the connection closed under it is retried once on a new
session only when it cannot have run twice (``tools/list``, or a call the server refused
as "session terminated"). :meth:`McpManager.close` ends every session and its process.

Transports:

* ``stdio`` — the server program runs **inside the sandbox** (``SandboxBackend.command``:
  bubblewrap namespaces, rlimits, an unprivileged uid), confined by the server's own
  ``permissions`` (no network and no writable filesystem unless granted). Without a usable
  sandbox the server is refused, never run unconfined. The sandbox shows only the system's
  read-only binds, so the server's own files are bound read-only too: every absolute path
  in ``command`` (after the program) and in ``env.PYTHONPATH`` that exists on the host —
  e.g. a Python server's script and the site-packages holding the ``mcp`` package.
  Nothing else of the host is visible. (The process backend cannot filter by host: a
  server granted any host shares the worker's network.) A long-lived server's CPU time is
  cumulative, so the per-call ceiling does not fit it: its limit is
  ``permissions.cpu_seconds`` or :data:`SERVER_CPU_SECONDS` (a server that uses it up is
  killed and restarted on next use).
* ``http`` (streamable HTTP) — the URL's host must be covered by the server's
  ``permissions.network`` (refused before connecting otherwise). ``secret_headers`` are
  read from the **shared** secret scope (``SecretStore.get("_shared", name)``): a session
  is shared by every tenant of the worker, so no tenant's own secret may go into it.

Secrets named in a stdio server's ``permissions.secrets`` are likewise read from the
shared scope and handed to the server process as environment variables when it starts.

Mapping, ``tools/list`` → :class:`~agentflow_core.tools.ToolSpec`: id ``server.name`` with
the name reduced to letters, digits, ``_`` and ``-`` (``say hello`` → ``say_hello``; the
original name travels in the handler), the server's permissions, cost, rate limit,
timeout and security level; ``include_tools`` filters by original or mapped name. The list
is cached per server for :data:`LIST_TTL_S`, dropped on reconnect and on
``notifications/tools/list_changed`` (sent by pre-2026 servers; 2026-07-28 servers only
notify listeners, so for them the TTL applies).

Mapping, ``tools/call`` → tool output (always JSON):

* ``structuredContent`` when the server sends it, unchanged — it is what the tool's
  ``outputSchema`` describes (the SDK's servers wrap a bare value as ``{"result": v}``);
* otherwise an object ``{"text": "<text blocks joined by newlines>"}`` — text is never
  parsed as JSON (``"5"`` stays a string), plus ``"content": [...]`` descriptors when the
  result holds images, audio or resources (type, MIME type, size, URI — not the bytes);
* ``isError: true`` → :class:`~agentflow_worker.tools.errors.ToolFailure` with the server's
  text; protocol and transport failures → ToolFailure naming server and tool; the call's
  own timeout → ``TimeoutError`` (the registry records it as ``timeout``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import anyio
from pydantic import ValidationError

from agentflow_core.errors import ConfigurationError
from agentflow_core.exec_profile import ExecProfile, ExecProfileCompiler, TenantToolPolicy, ToolDenied, host_matches
from agentflow_core.tools import McpHandler, ToolSpec
from agentflow_core.tools_config import McpConfig, McpServerConfig
from agentflow_worker.agents.base import AgentError
from agentflow_worker.sandbox.base import SandboxBackend, SandboxUnavailable
from agentflow_worker.secrets import SecretStore
from agentflow_worker.tools.errors import ToolFailure

if TYPE_CHECKING:
    from mcp import Client
    from mcp.types import CallToolResult, Tool

log = logging.getLogger("agentflow.tools.mcp")

#: how long a server's tool list is reused before it is listed again
LIST_TTL_S = 60.0
#: CPU seconds of a stdio server's whole life when its permissions name none
SERVER_CPU_SECONDS = 3600.0
#: the shared secret scope (sessions serve every tenant of the worker)
SHARED_SCOPE = "_shared"
#: the most tools/list pages followed (a server whose cursor never ends cannot hang us)
MAX_PAGES = 100
#: how long close() waits for a session to shut down before cancelling it
_CLOSE_GRACE_S = 10.0
#: connection-level JSON-RPC codes of the SDK (mcp_types.jsonrpc)
_CONNECTION_CLOSED = -32000
_REQUEST_TIMEOUT = -32001
_INVALID_REQUEST = -32600

_SERVER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]+")


def tool_local_name(name: str) -> str:
    """An MCP tool name as the part after ``server.`` of a tool id.

    Only letters, digits, ``_`` and ``-``; no ``__`` (the LLM function-name mangling turns
    ``.`` into ``__`` and back) and no leading ``_`` (it would merge with that separator)."""
    local = re.sub("_{2,}", "_", _NOT_ID.sub("_", name)).lstrip("_")
    return local or "tool"


class McpManager:
    """The MCP sessions of one worker. See the module docstring for the rules."""

    def __init__(
        self,
        config: McpConfig,
        *,
        sandbox: SandboxBackend | None,
        compiler: ExecProfileCompiler,
        secrets: SecretStore,
        list_ttl_s: float = LIST_TTL_S,
    ) -> None:
        bad = [name for name in config.servers if not _SERVER_NAME.match(name)]
        if bad:
            raise ConfigurationError(
                f"MCP server name(s) {', '.join(repr(b) for b in bad)} must start with a letter and hold only "
                "letters, digits, '_' and '-' (at most 64): they prefix tool ids"
            )
        self.config = config
        self.sandbox = sandbox
        self.compiler = compiler
        self.secrets = secrets
        self.list_ttl_s = list_ttl_s
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listed: dict[str, tuple[float, list[ToolSpec]]] = {}
        self._closed = False

    # --- public -----------------------------------------------------------------------

    async def list_tools(self, server: str) -> list[ToolSpec]:
        """The tools of ``server`` as ToolSpecs (cached; see :data:`LIST_TTL_S`)."""
        cfg = self._server(server)
        cached = self._listed.get(server)
        session = self._sessions.get(server)
        if (
            cached is not None
            and session is not None
            and session.alive
            and time.monotonic() - cached[0] < self.list_ttl_s
        ):
            return cached[1]
        tools = await self._request(server, "tools/list", self._list_all, idempotent=True)
        specs = self._specs(server, cfg, tools)
        self._listed[server] = (time.monotonic(), specs)
        return specs

    async def call(self, server: str, tool: str, arguments: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        """``tools/call`` of the MCP tool named ``tool`` (its original name), mapped to JSON."""
        cfg = self._server(server)
        timeout = timeout_s if timeout_s is not None else cfg.timeout_s

        async def send(client: Client) -> CallToolResult:
            return await client.call_tool(tool, arguments, read_timeout_seconds=timeout)

        try:
            result = await self._request(server, f"tools/call '{tool}'", send, idempotent=False)
        except _RequestTimeout:
            raise TimeoutError(f"MCP tool '{tool}' of server '{server}' timed out after {timeout:g}s") from None
        if result.is_error:
            text = _text_of(result) or "(no message)"
            raise ToolFailure(f"MCP tool '{tool}' of server '{server}' failed: {text}")
        return map_result(result)

    async def close(self) -> None:
        """End every session; a stdio server's process is stopped and reaped."""
        self._closed = True
        sessions = list(self._sessions.values())
        self._sessions.clear()
        self._listed.clear()
        await asyncio.gather(*(s.shutdown() for s in sessions), return_exceptions=True)

    # --- sessions ---------------------------------------------------------------------

    def _server(self, server: str) -> McpServerConfig:
        if not self.config.enabled:
            raise AgentError("MCP is disabled (mcp.enabled: false)")
        if self._closed:
            raise AgentError("the MCP manager of this worker is closed")
        cfg = self.config.servers.get(server)
        if cfg is None:
            known = ", ".join(sorted(self.config.servers)) or "none"
            raise AgentError(f"unknown MCP server '{server}' (configured: {known})")
        return cfg

    async def _request(self, server: str, what: str, send: Callable[[Client], Any], *, idempotent: bool) -> Any:
        from mcp import MCPError

        for attempt in (1, 2):
            session = await self._session(server)
            try:
                return await send(session.client)
            except MCPError as exc:
                if exc.code == _REQUEST_TIMEOUT:
                    raise _RequestTimeout() from exc
                # 404 on a known session id: the server forgot us (restarted) before running
                # anything, so a fresh session may safely send the request again.
                refused = exc.code == _INVALID_REQUEST and exc.message == "Session terminated"
                if exc.code == _CONNECTION_CLOSED or refused:
                    session.broken = True
                    self._listed.pop(server, None)
                    if attempt == 1 and (idempotent or refused):
                        log.warning("MCP server '%s': connection lost during %s; reconnecting once", server, what)
                        continue
                    await session.settle(1.0)
                    cause = await session.diagnose()
                    raise ToolFailure(
                        f"MCP server '{server}': the connection closed during {what}"
                        + (f" ({cause})" if cause else "")
                        + ("" if idempotent else "; not retried, as the call may have run")
                    ) from exc
                raise ToolFailure(f"MCP server '{server}' rejected {what}: {exc.message} (code {exc.code})") from exc
            except (ToolFailure, AgentError, TimeoutError, asyncio.CancelledError):
                raise
            except ValidationError as exc:
                raise ToolFailure(
                    f"MCP server '{server}' sent an invalid reply to {what}: {exc.errors()[0]['msg']}"
                ) from exc
            except Exception as exc:  # the SDK's own checks (e.g. output schema) and transport errors
                raise ToolFailure(f"MCP server '{server}': {what} failed: {_describe(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _session(self, server: str) -> _Session:
        session = self._sessions.get(server)
        if session is not None and session.alive:
            return session
        lock = self._locks.setdefault(server, asyncio.Lock())
        async with lock:
            session = self._sessions.get(server)
            if session is not None and session.alive:
                return session
            if session is not None:
                log.warning(
                    "MCP server '%s': session ended (%s); reconnecting", server, session.failure_text() or "hung up"
                )
                self._sessions.pop(server, None)
                self._listed.pop(server, None)
                await session.shutdown()
            cfg = self._server(server)
            session = await self._open(server, cfg)
            if self._closed:  # close() ran while we connected: this session must not outlive it
                await session.shutdown()
                raise AgentError("the MCP manager of this worker is closed")
            self._sessions[server] = session
            return session

    async def _open(self, server: str, cfg: McpServerConfig) -> _Session:
        try:
            import mcp  # noqa: F401
        except ImportError as exc:
            raise AgentError("MCP needs the 'mcp' package on the worker: pip install 'agentflow[mcp]'") from exc
        session = self._stdio(server, cfg) if cfg.transport == "stdio" else self._http(server, cfg)
        await session.start(cfg.timeout_s)
        log.info("MCP server '%s' connected (%s, protocol %s)", server, cfg.transport, session.client.protocol_version)
        return session

    def _stdio(self, server: str, cfg: McpServerConfig) -> _Session:
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        assert cfg.command is not None  # the config model guarantees it for stdio
        sandbox = self.sandbox
        if sandbox is None:
            raise AgentError(
                f"MCP server '{server}' (stdio) cannot start: this worker has no sandbox, "
                "and stdio MCP servers never run unconfined"
            )
        problem = sandbox.available()
        if problem:
            raise AgentError(
                f"MCP server '{server}' (stdio) cannot start: the {sandbox.name} sandbox is unavailable "
                f"({problem}); stdio MCP servers never run unconfined"
            )
        profile = dataclasses.replace(self.server_profile(server, cfg), ro_binds=tuple(read_paths(cfg)))
        if profile.runtime != sandbox.name:
            raise AgentError(
                f"MCP server '{server}' (stdio, security_level {cfg.security_level}) must run in the "
                f"'{profile.runtime}' sandbox, but this worker runs stdio MCP servers in '{sandbox.name}'"
            )
        env = dict(cfg.env)
        for name in cfg.permissions.secrets:
            env[name] = self.secrets.get(SHARED_SCOPE, name)
        try:
            argv = sandbox.command(profile, list(cfg.command), env)
        except (SandboxUnavailable, ValueError) as exc:
            raise AgentError(
                f"MCP server '{server}' (stdio) cannot start in the {sandbox.name} sandbox: {exc}"
            ) from exc
        stderr = _StderrTail(server)
        params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
        session = _Session(server, stderr, lambda: self._tools_changed(server))
        session.transport = stdio_client(params, errlog=stderr.writer)
        return session

    def _http(self, server: str, cfg: McpServerConfig) -> _Session:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        assert cfg.url is not None  # the config model guarantees it for http
        host = url_host(cfg.url)
        if host is None:
            raise AgentError(f"MCP server '{server}': url '{cfg.url}' is not an http(s) URL with a host")
        if not any(host_matches(pattern, host) for pattern in cfg.permissions.network):
            allowed = ", ".join(cfg.permissions.network) or "none"
            raise ToolDenied(
                f"MCP server '{server}': host '{host}' of its url is not covered by its permissions.network "
                f"(allowed: {allowed}); refusing to connect"
            )
        headers = {header: self.secrets.get(SHARED_SCOPE, secret) for header, secret in cfg.secret_headers.items()}
        session = _Session(server, None, lambda: self._tools_changed(server))

        async def note_status(response: httpx2.Response) -> None:
            # The SDK reports any non-2xx as "Server returned an error response": keep the
            # status, so a wrong API key reads as the 401 it is.
            if response.status_code >= 400:
                session.http_error = f"HTTP {response.status_code} {response.reason_phrase} from {response.url}"

        http = httpx2.AsyncClient(
            headers=headers,
            # the SDK's defaults: a server may hold a response stream open for minutes
            timeout=httpx2.Timeout(30.0, read=300.0),
            event_hooks={"response": [note_status]},
        )
        session.transport = _http_transport(streamable_http_client(cfg.url, http_client=http), http)
        return session

    def server_profile(self, server: str, cfg: McpServerConfig) -> ExecProfile:
        """The confinement of a stdio server's process: its own permissions under the
        installation's ceilings (tenants narrow each call later, in the registry)."""
        spec = ToolSpec(
            id=f"mcp.{server}",
            handler=McpHandler(kind="mcp", server=server, tool="*"),
            permissions=cfg.permissions,
            timeout_s=cfg.timeout_s,
            security_level=cfg.security_level,
        )
        # The server asks for exactly its permissions; the policy grants exactly those.
        own = TenantToolPolicy(
            allowed_hosts=list(cfg.permissions.network), allowed_secrets=list(cfg.permissions.secrets)
        )
        profile = self.compiler.compile(spec, own)
        return dataclasses.replace(profile, cpu_seconds=cfg.permissions.cpu_seconds or SERVER_CPU_SECONDS)

    # --- listing ----------------------------------------------------------------------

    @staticmethod
    async def _list_all(client: Client) -> list[Tool]:
        tools: list[Tool] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor, cache_mode="bypass")
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                return tools
        log.warning("MCP tools/list still had more pages after %d; using what was listed", MAX_PAGES)
        return tools

    def _specs(self, server: str, cfg: McpServerConfig, tools: list[Tool]) -> list[ToolSpec]:
        include = set(cfg.include_tools) if cfg.include_tools is not None else None
        specs: list[ToolSpec] = []
        taken: set[str] = set()
        for tool in tools:
            local = tool_local_name(tool.name)
            if include is not None and tool.name not in include and local not in include:
                continue
            tool_id = f"{server}.{local}"[:128]
            n = 2
            while tool_id in taken:  # two names reduced to the same id
                suffix = f"_{n}"
                tool_id = f"{server}.{local}"[: 128 - len(suffix)] + suffix
                n += 1
            try:
                spec = ToolSpec(
                    id=tool_id,
                    description=(tool.description or tool.title or "")[:4000],
                    input_schema=tool.input_schema,
                    output_schema=tool.output_schema,
                    handler=McpHandler(kind="mcp", server=server, tool=tool.name),
                    permissions=cfg.permissions,
                    cost_per_call=cfg.cost_per_call,
                    rate_limit=cfg.rate_limit,
                    timeout_s=cfg.timeout_s,
                    security_level=cfg.security_level,
                )
            except ValidationError as exc:
                problem = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
                )
                log.warning("MCP server '%s': tool %r left out: %s", server, tool.name, problem)
                continue
            taken.add(tool_id)
            specs.append(spec)
        return specs

    def _tools_changed(self, server: str) -> None:
        self._listed.pop(server, None)


class McpToolHandler:
    """The registry's handler for ``kind: mcp`` tools (``ToolRuntime.handlers["mcp"]``)."""

    def __init__(self, manager: McpManager) -> None:
        self.manager = manager

    async def invoke(self, spec: ToolSpec, profile: ExecProfile, arguments: dict[str, Any], env: dict[str, str]) -> Any:
        # ``env`` (the tenant's grant of the tool's secrets) is not forwarded: the server is
        # shared by every tenant and got its secrets from the shared scope when it started.
        handler = spec.handler
        if not isinstance(handler, McpHandler):
            raise ToolFailure(f"tool '{spec.id}' is not an MCP tool (handler kind '{handler.kind}')")
        return await self.manager.call(handler.server, handler.tool, arguments, timeout_s=profile.timeout_s)


# --- result mapping -------------------------------------------------------------------


def _text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def _size(data: str) -> int | None:
    try:
        return len(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        return None


def _descriptor(block: Any) -> dict[str, Any]:
    kind = block.type
    if kind in ("image", "audio"):
        return {"type": kind, "mime_type": block.mime_type, "bytes": _size(block.data)}
    if kind == "resource_link":
        return {"type": kind, "uri": str(block.uri), "name": block.name, "mime_type": block.mime_type}
    if kind == "resource":
        res = block.resource
        out: dict[str, Any] = {"type": kind, "uri": str(res.uri), "mime_type": res.mime_type}
        if getattr(res, "text", None) is not None:
            out["text"] = res.text
        else:
            out["bytes"] = _size(getattr(res, "blob", ""))
        return out
    return {"type": str(kind)}


def map_result(result: CallToolResult) -> Any:
    """A successful ``tools/call`` result as the tool's JSON output (see the module docstring)."""
    if result.structured_content is not None:
        return result.structured_content
    output: dict[str, Any] = {"text": _text_of(result)}
    others = [_descriptor(block) for block in result.content if block.type != "text"]
    if others:
        output["content"] = others
    return output


# --- plumbing -------------------------------------------------------------------------


class _RequestTimeout(Exception):
    pass


def url_host(url: str) -> str | None:
    """``host:port`` of an http(s) URL (the port made explicit), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return f"{parts.hostname}:{port}"


def read_paths(cfg: McpServerConfig) -> list[str]:
    """Host paths a stdio server needs to see (read-only): the absolute paths in its
    command after the program, and in its ``PYTHONPATH``, that exist."""
    assert cfg.command is not None
    candidates = [arg for arg in cfg.command[1:] if arg.startswith("/")]
    candidates += [p for p in cfg.env.get("PYTHONPATH", "").split(os.pathsep) if p.startswith("/")]
    seen: list[str] = []
    for path in candidates:
        normal = os.path.normpath(path)
        if os.path.exists(normal) and normal not in seen:
            seen.append(normal)
    return seen


def _describe(exc: BaseException) -> str:
    """The innermost meaningful cause, in one line (task groups wrap errors in groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = next((e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)), exc.exceptions[0])
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


class _StderrTail:
    """A stdio server's stderr: logged line by line, the last lines kept for error messages.

    A pipe drained by a thread (not a file): a long-lived server must never block on a full
    pipe, nor fill a disk."""

    def __init__(self, server: str) -> None:
        read_fd, write_fd = os.pipe()
        self.writer: TextIO = os.fdopen(write_fd, "w")
        self._reader = os.fdopen(read_fd, "rb")
        self.lines: deque[str] = deque(maxlen=30)
        self._lock = threading.Lock()
        self.server = server
        self._thread = threading.Thread(target=self._pump, name=f"mcp-{server}-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with self._reader:
            for raw in self._reader:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    with self._lock:
                        self.lines.append(line)
                    log.debug("MCP server '%s' stderr: %s", self.server, line)

    def release(self) -> None:
        """Drop our copy of the write end (the child has its own): EOF comes when it exits."""
        with contextlib.suppress(OSError):
            self.writer.close()

    def wait_closed(self, timeout_s: float) -> None:
        """Block until the server's stderr closed (it exited) or ``timeout_s`` passed."""
        self._thread.join(timeout_s)

    def text(self) -> str:
        with self._lock:
            return " | ".join(list(self.lines)[-8:])


class _Watched(AbstractAsyncContextManager[Any]):
    """A transport whose read stream reports the server hanging up (EOF) to its session."""

    def __init__(self, inner: AbstractAsyncContextManager[Any], session: _Session) -> None:
        self.inner = inner
        self.session = session

    async def __aenter__(self) -> Any:
        read_stream, write_stream = await self.inner.__aenter__()
        return _EofWatch(read_stream, self.session), write_stream

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self.inner.__aexit__(exc_type, exc, tb)


class _EofWatch:
    """The SDK's ReadStream protocol around a transport's read stream."""

    def __init__(self, inner: Any, session: _Session) -> None:
        self._inner = inner
        self._session = session

    def __getattr__(self, name: str) -> Any:  # last_context and friends
        return getattr(self._inner, name)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._session.hang_up()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _EofWatch:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except StopAsyncIteration:
            self._session.hang_up()
            raise
        except anyio.ClosedResourceError:
            self._session.hang_up()
            raise

    async def __aenter__(self) -> _EofWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.aclose()


@contextlib.asynccontextmanager
async def _http_transport(inner: AbstractAsyncContextManager[Any], http: Any) -> AsyncIterator[Any]:
    """The streamable-HTTP transport with its httpx client closed after it."""
    async with http, inner as streams:
        yield streams


class _Session:
    """One open MCP session, owned by a task of its own.

    The SDK's client lives in anyio task groups, which must be entered and left by the
    same task; steps come and go in their own tasks, so a dedicated task holds the session
    open and every caller just sends requests through it."""

    def __init__(self, server: str, stderr: _StderrTail | None, on_tools_changed: Callable[[], None]) -> None:
        self.server = server
        self.transport: AbstractAsyncContextManager[Any] | None = None
        self.stderr = stderr
        self.on_tools_changed = on_tools_changed
        self.hung_up = False
        self.broken = False
        self.failure: BaseException | None = None
        #: the last HTTP error status seen (http transport)
        self.http_error: str | None = None
        self._client: Client | None = None
        self._stop = asyncio.Event()
        self._owner: asyncio.Task[None] | None = None

    @property
    def client(self) -> Client:
        assert self._client is not None, "session not started"
        return self._client

    @property
    def alive(self) -> bool:
        return not (self.hung_up or self.broken or self._owner is None or self._owner.done())

    def failure_text(self) -> str:
        parts = []
        if self.http_error is not None:
            parts.append(self.http_error)
        if self.failure is not None:
            parts.append(_describe(self.failure))
        if self.stderr is not None:
            tail = self.stderr.text()
            if tail:
                parts.append(f"stderr: {tail}")
        return "; ".join(parts)

    async def diagnose(self) -> str:
        """:meth:`failure_text` once a dead server's last words have been read."""
        if self.stderr is not None and (self.hung_up or self.failure is not None):
            await asyncio.to_thread(self.stderr.wait_closed, 0.5)
        return self.failure_text()

    async def start(self, timeout_s: float) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._owner = asyncio.create_task(self._own(ready, timeout_s), name=f"mcp-session-{self.server}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout_s + 5)
        except TimeoutError:
            ready.cancel()
            await self.shutdown()
            raise AgentError(
                f"MCP server '{self.server}' did not complete the handshake within {timeout_s + 5:g}s"
            ) from None
        except asyncio.CancelledError:
            ready.cancel()
            await self.shutdown()
            raise
        except Exception as exc:
            await self.shutdown()
            detail = await self.diagnose() or _describe(exc)
            raise AgentError(f"MCP server '{self.server}' could not be connected: {detail}") from exc

    async def _own(self, ready: asyncio.Future[None], timeout_s: float) -> None:
        from mcp import Client
        from mcp.types import Implementation

        assert self.transport is not None, "transport not set"
        client = Client(
            _Watched(self.transport, self),
            mode="auto",
            cache=None,
            read_timeout_seconds=timeout_s,
            message_handler=self._on_message,
            client_info=Implementation(name="agentflow-worker", version="1"),
        )
        try:
            try:
                async with client:
                    self._client = client
                    self.http_error = None  # from here on, only errors of this session's requests
                    if self.stderr is not None:
                        self.stderr.release()
                    if not ready.done():
                        ready.set_result(None)
                    await self._stop.wait()
            finally:
                if self.stderr is not None:
                    self.stderr.release()
        except asyncio.CancelledError:
            if not ready.done():
                ready.cancel()
            raise
        except BaseException as exc:  # what ended the session: reported to the next caller
            self.failure = exc
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(_describe(exc)))
            elif not self._stop.is_set():
                log.warning("MCP server '%s': session failed: %s", self.server, _describe(exc))
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise

    async def _on_message(self, message: Any) -> None:
        from mcp.types import ToolListChangedNotification

        if isinstance(message, ToolListChangedNotification):
            self.on_tools_changed()
        elif isinstance(message, Exception):
            log.warning("MCP server '%s': transport error: %s", self.server, _describe(message))

    def hang_up(self) -> None:
        """The server ended the connection: nothing more can come, so wind the session down now
        (a stdio server's process is reaped at once, not on the next use)."""
        self.hung_up = True
        self._stop.set()

    async def settle(self, wait_s: float) -> None:
        """Give a failing session a moment to record why it failed (for the error message)."""
        if self._owner is not None and not self._owner.done():
            await asyncio.wait({self._owner}, timeout=wait_s)

    async def shutdown(self) -> None:
        self._stop.set()
        owner = self._owner
        if owner is None or owner.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(owner), _CLOSE_GRACE_S)
        except TimeoutError:
            owner.cancel()
            with contextlib.suppress(BaseException):
                await owner
        except Exception:  # the failure is already recorded on the session
            pass
