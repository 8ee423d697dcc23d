"""Tools: the registry runtime, sandboxed handlers, MCP, rate limits."""
