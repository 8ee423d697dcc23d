"""A real MCP server (SDK 2.x ``MCPServer``) for the MCP adapter's tests.

    python tests/support/mcp_server.py --transport stdio
    python tests/support/mcp_server.py --transport http --port 8765 [--require-header X-Api-Key=secret]

Self-contained on purpose: under the stdio transport it runs inside the worker's process
sandbox, where only the ``mcp`` package (on ``PYTHONPATH``) and this file are visible, so
it imports nothing from the repository.

Tools: ``add`` (and ``calls``: how often ``add`` ran), ``echo`` (text content only),
``fail`` (an ``isError`` result), ``slow``, ``crash`` (the process exits mid-call),
``pixel`` (text + an image), ``say hello`` (a name the adapter must sanitise) and
``whoami`` (what the process can reach: proves the sandbox applies).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
from typing import Any

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ListToolsResult, PaginatedRequestParams, TextContent

# A 1x1 transparent PNG.
_PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


class PagedServer(MCPServer):
    """Lists its tools ``page_size`` at a time, so a client must follow ``nextCursor``."""

    def __init__(self, *args: Any, page_size: int = 0, **kwargs: Any) -> None:
        self.page_size = page_size
        super().__init__(*args, **kwargs)

    async def _handle_list_tools(self, ctx: Any, params: PaginatedRequestParams | None) -> ListToolsResult:
        tools = sorted(await self.list_tools(), key=lambda t: t.name)
        if self.page_size <= 0:
            return ListToolsResult(tools=tools)
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + self.page_size
        return ListToolsResult(tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None)


def build(page_size: int = 0) -> MCPServer:
    server = PagedServer("agentflow-test", version="1.0", page_size=page_size, log_level="WARNING")
    handled = {"calls": 0}

    @server.tool(description="How many calls of `add` this process has answered.")
    def calls() -> int:
        return handled["calls"]

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        handled["calls"] += 1
        return a + b

    @server.tool(description="Return the text unchanged, as plain text content.", structured_output=False)
    def echo(text: str) -> str:
        return text

    @server.tool(description="Always fails.")
    def fail() -> str:
        raise ToolError("the fail tool failed on purpose")

    @server.tool(description="Ends the server process mid-call.")
    def crash() -> str:
        os._exit(3)

    @server.tool(description="Sleep, then say how long.")
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool(description="A caption and a picture.", structured_output=False)
    def pixel() -> list[Any]:
        return [TextContent(type="text", text="one pixel"), Image(data=_PIXEL, format="png")]

    @server.tool(name="say hello", description="A tool whose name is not a valid AgentFlow tool id.")
    def say_hello(name: str) -> str:
        return f"hello {name}"

    @server.tool(description="What this process can reach: a TCP port, a file, its environment.")
    def whoami(host: str = "127.0.0.1", port: int = 5432, path: str = "/etc/hostname") -> dict[str, Any]:
        try:
            with socket.create_connection((host, port), timeout=2):
                network, network_error = True, None
        except OSError as exc:
            network, network_error = False, f"{type(exc).__name__}: {exc}"
        try:
            with open(path, "rb") as handle:
                handle.read(1)
            readable, read_error = True, None
        except OSError as exc:
            readable, read_error = False, f"{type(exc).__name__}: {exc}"
        return {
            "pid": os.getpid(),
            "network": network,
            "network_error": network_error,
            "read_file": readable,
            "read_error": read_error,
            "env": sorted(os.environ),
        }

    return server


def _require_header(app: Any, name: str, value: str) -> Any:
    """Refuse (401) every request without ``name: value``: stands in for an API-key check."""
    wanted = (name.lower().encode(), value.encode())

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and wanted not in scope.get("headers", []):
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"missing or wrong " + wanted[0]})
            return
        await app(scope, receive, send)

    return guarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--page-size", type=int, default=0, help="list tools this many at a time (0: all at once)")
    parser.add_argument("--require-header", default=None, metavar="NAME=VALUE")
    args = parser.parse_args()
    server = build(args.page_size)
    if args.transport == "stdio":
        server.run("stdio")
        return
    import uvicorn

    app: Any = server.streamable_http_app(host="127.0.0.1")
    if args.require_header:
        name, _, value = args.require_header.partition("=")
        app = _require_header(app, name, value)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
