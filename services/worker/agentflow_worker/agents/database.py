"""The ``database`` agent: one parameterised SQL statement against a configured Postgres.

Read-only by default, enforced twice:

1. a statement allowlist checked on the SQL text (comments, string literals, quoted
   identifiers and dollar-quoted bodies skipped): it must start with SELECT, WITH,
   VALUES, SHOW or EXPLAIN (not EXPLAIN ANALYZE), may not contain INSERT, UPDATE, DELETE,
   MERGE or INTO (data-modifying CTEs, SELECT INTO, SELECT ... FOR UPDATE), and must be
   one statement;
2. the statement runs in a ``READ ONLY`` transaction, so Postgres itself refuses writes
   the text check cannot see (a function that inserts, ``nextval``).

Neither replaces a least-privilege database role: READ ONLY does not stop e.g.
``pg_terminate_backend`` or reads of everything the role may read. Give each connection a
role that can do only what its workflows need.

Values reach Postgres only as ``$n`` bind parameters, never in the SQL text. Results are
made JSON-safe: Decimal → string (exact; a float would silently round money), date/time →
ISO 8601, interval → seconds, UUID and network addresses → string, bytes → base64.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from agentflow_core.agent_configs.database import DatabaseAgentConfig
from agentflow_worker.agents.base import AgentError, StepContext, parse_config
from agentflow_worker.agents.templating import render_value, step_scope
from agentflow_worker.secrets import MissingSecret

_POOLS_KEY = "database.pools"
_READ_STARTS = frozenset({"SELECT", "WITH", "VALUES", "SHOW", "EXPLAIN"})
_WRITE_WORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


# -- the statement check -----------------------------------------------------------------


def _tokens(sql: str) -> Iterator[str]:
    """Upper-cased words and the characters ``;`` and ``(`` of ``sql``, skipping comments,
    string literals, quoted identifiers and dollar-quoted strings."""
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end == -1 else end + 1
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2  # Postgres block comments nest
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise AgentError("database: the query has an unterminated /* comment")
        elif ch in "'\"":
            # E'..' strings allow backslash escapes; everything else doubles the quote
            escapes = ch == "'" and i > 0 and sql[i - 1] in "eE" and (i < 2 or not sql[i - 2].isalnum())
            i += 1
            while True:
                if i >= n:
                    kind = "string literal" if ch == "'" else "quoted identifier"
                    raise AgentError(f"database: the query has an unterminated {kind}")
                if escapes and sql[i] == "\\":
                    i += 2
                elif sql[i] == ch:
                    if sql.startswith(ch * 2, i):
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    i += 1
        elif ch == "$" and (tag := _DOLLAR_TAG.match(sql, i)) is not None:
            end = sql.find(tag.group(0), tag.end())
            if end == -1:
                raise AgentError(f"database: the query has an unterminated {tag.group(0)} string")
            i = end + len(tag.group(0))
        elif (word := _WORD.match(sql, i)) is not None:
            yield word.group(0).upper()
            i = word.end()
        else:
            if ch in ";(":
                yield ch
            i += 1


def check_statement(sql: str, *, read_only: bool) -> str:
    """The statement's first keyword, after refusing multiple statements and (when
    ``read_only``) anything outside the read allowlist."""
    tokens = list(_tokens(sql))
    while tokens and tokens[-1] == ";":
        tokens.pop()
    if ";" in tokens:
        raise AgentError("database: the query holds more than one statement; send one statement per step")
    words = [t for t in tokens if t != "("]
    if not words:
        raise AgentError("database: the query is empty (only comments or whitespace)")
    first = words[0]
    if not read_only:
        return first
    if first not in _READ_STARTS:
        raise AgentError(
            f"database: '{first}' statements are not allowed with read_only: true "
            f"(allowed: {', '.join(sorted(_READ_STARTS))}); set read_only: false to write"
        )
    if first == "EXPLAIN" and ({"ANALYZE", "ANALYSE"} & set(words)):
        raise AgentError("database: EXPLAIN ANALYZE runs the statement; it is not allowed with read_only: true")
    writes = sorted(_WRITE_WORDS & set(words))
    if writes:
        raise AgentError(
            f"database: the query contains {', '.join(writes)}, which may write; not allowed with read_only: true"
        )
    return first


# -- JSON-safe values --------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, asyncpg.Record):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, asyncpg.Range):
        return {
            "lower": json_safe(value.lower),
            "upper": json_safe(value.upper),
            "lower_inc": value.lower_inc,
            "upper_inc": value.upper_inc,
            "empty": value.isempty,
        }
    return str(value)


# -- connections -------------------------------------------------------------------------


def _redact_dsn(message: str, dsn: str) -> str:
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    message = message.replace(dsn, "[dsn]")
    return message.replace(password, "[redacted]") if password else message


def _postgres_message(exc: asyncpg.PostgresError) -> str:
    text = str(getattr(exc, "message", None) or exc)
    if isinstance(exc, asyncpg.DataError) and text.startswith("invalid input for query argument"):
        # raised by asyncpg itself when a value does not fit the parameter's type
        return f"bad parameter: {text}"
    detail, hint = getattr(exc, "detail", None), getattr(exc, "hint", None)
    return (
        text
        + (f" ({detail})" if detail else "")
        + (f" hint: {hint}" if hint else "")
        + (f" [SQLSTATE {exc.sqlstate}]" if getattr(exc, "sqlstate", None) else "")
    )


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb in and out as Python values: dict params work, results come back parsed
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class DatabaseAgent:
    """``database``: settings in :class:`DatabaseAgentConfig`."""

    #: connections per DSN kept by the worker
    pool_max_size: int = 4
    #: extra time the client waits beyond statement_timeout (connecting, the round trip)
    grace_s: float = 5.0

    def _dsn(self, ctx: StepContext, name: str) -> str:
        dsn = ctx.svc.databases.get(name)
        if dsn:
            return dsn
        secret = f"DB_{name.upper()}"
        try:
            return ctx.svc.secrets.get(ctx.tenant, secret)
        except MissingSecret as exc:
            raise AgentError(
                f"database: connection '{name}' is not configured on this worker "
                f"(no databases entry '{name}' and no secret '{secret}' for tenant '{ctx.tenant}')"
            ) from exc

    async def _create_pool(self, dsn: str) -> asyncpg.Pool:
        return await asyncpg.create_pool(dsn, min_size=0, max_size=self.pool_max_size, init=_init_connection)

    async def _pool(self, ctx: StepContext, name: str, dsn: str) -> asyncpg.Pool:
        pools: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task[asyncpg.Pool]]]
        pools = ctx.svc.shared.setdefault(_POOLS_KEY, {})
        loop = asyncio.get_running_loop()
        entry = pools.get(dsn)
        if entry is None or entry[0] is not loop:
            # a task, not the pool: steps starting together share one pool being created
            task = loop.create_task(self._create_pool(dsn))
            entry = (loop, task)
            pools[dsn] = entry
            ctx.svc.closers.append(lambda: _close_pool(task))
        try:
            return await asyncio.shield(entry[1])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            if pools.get(dsn) is entry:
                del pools[dsn]  # let the next step try again
            message = _redact_dsn(f"{type(exc).__name__}: {exc}", dsn)
            raise AgentError(f"database: cannot connect to '{name}': {message}") from exc

    async def run(self, ctx: StepContext) -> Any:
        cfg = parse_config(DatabaseAgentConfig, ctx)
        check_statement(cfg.query, read_only=cfg.read_only)
        params = render_value(cfg.params, step_scope(ctx))
        dsn = self._dsn(ctx, cfg.connection)
        try:
            async with asyncio.timeout(cfg.timeout_s + self.grace_s):
                pool = await self._pool(ctx, cfg.connection, dsn)
                async with pool.acquire() as conn:
                    return await self._execute(conn, cfg, params)
        except TimeoutError as exc:
            raise AgentError(
                f"database '{cfg.connection}': no answer within timeout_s={cfg.timeout_s} "
                f"(+{self.grace_s}s to connect); gave up"
            ) from exc
        except asyncpg.QueryCanceledError as exc:
            raise AgentError(
                f"database '{cfg.connection}': the query ran longer than timeout_s={cfg.timeout_s} and was "
                f"cancelled ({exc})"
            ) from exc
        except asyncpg.ReadOnlySQLTransactionError as exc:
            raise AgentError(
                f"database '{cfg.connection}': the statement tried to write in a read-only transaction "
                f"(read_only: true): {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise AgentError(f"database '{cfg.connection}': {_postgres_message(exc)}") from exc
        except asyncpg.InterfaceError as exc:
            if isinstance(exc, ValueError):
                # asyncpg's check of a parameter against its type: "invalid input for query argument $1 ..."
                raise AgentError(f"database '{cfg.connection}': bad parameter: {exc}") from exc
            raise AgentError(f"database '{cfg.connection}': {_redact_dsn(str(exc), dsn)}") from exc
        except OSError as exc:
            raise AgentError(f"database '{cfg.connection}': connection failed: {_redact_dsn(str(exc), dsn)}") from exc

    async def _execute(self, conn: asyncpg.Connection, cfg: DatabaseAgentConfig, params: list[Any]) -> dict[str, Any]:
        async with conn.transaction(readonly=cfg.read_only):
            # statement_timeout cannot be a bind parameter; this is an int we computed
            await conn.execute(f"SET LOCAL statement_timeout = {max(1, math.ceil(cfg.timeout_s * 1000))}")
            stmt = await conn.prepare(cfg.query)
            expected = len(stmt.get_parameters())
            if expected != len(params):
                raise AgentError(
                    f"database '{cfg.connection}': the query has {expected} placeholder(s) ($1..${expected}) "
                    f"but params has {len(params)} value(s)"
                )
            if stmt.get_attributes():
                # a cursor fetches max_rows + 1 rows and no more, whatever the table holds
                cursor = await stmt.cursor(*params)
                records = await cursor.fetch(cfg.max_rows + 1)
                truncated = len(records) > cfg.max_rows
                rows = [json_safe(r) for r in records[: cfg.max_rows]]
                return {"rows": rows, "row_count": len(rows), "truncated": truncated}
            await stmt.fetch(*params)
            status = stmt.get_statusmsg() or ""
            tail = status.rsplit(" ", 1)[-1]
            return {
                "rows": [],
                "row_count": 0,
                "truncated": False,
                "command": status,
                "affected": int(tail) if tail.isdigit() else None,
            }


async def _close_pool(task: asyncio.Task[asyncpg.Pool]) -> None:
    if not task.done():
        task.cancel()
        return
    if task.cancelled() or task.exception() is not None:
        return
    pool = task.result()
    try:
        # graceful: waits for connections in use to come back, but not forever
        await asyncio.wait_for(pool.close(), timeout=10)
    except TimeoutError:
        pool.terminate()


async def close_pools(services: Any) -> None:
    """Close the worker's database pools now (``WorkerServices.aclose`` does it at shutdown)."""
    pools = services.shared.pop(_POOLS_KEY, {})
    for _, task in pools.values():
        await _close_pool(task)


DATABASE_AGENTS: dict[str, Any] = {"database": DatabaseAgent()}
