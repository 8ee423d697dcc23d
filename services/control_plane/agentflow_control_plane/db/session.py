"""The async SQLAlchemy engine and session factory of one process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger("agentflow.db")


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        # No overflow: overflow connections are closed when returned, and reconnecting
        # (plus re-preparing statements) under load costs more than waiting for one.
        max_overflow=0,
        pool_timeout=30,
        # No pre-ping: it costs a round trip per checkout on the hot path. A connection
        # found dead raises a disconnect error, which invalidates the whole pool, so an
        # outage costs at most one failed attempt per process (the engine loops retry).
        pool_pre_ping=False,
        pool_recycle=1800,
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
    )


async def driver(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one.

    Beware: SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement,
    so statements sent straight to this connection run in autocommit mode unless
    SQLAlchemy already executed something in the transaction. Use it for single
    statements, or use :func:`pg_transaction`.
    """
    raw = await conn.get_raw_connection()
    connection: asyncpg.Connection = raw.driver_connection
    return connection


@asynccontextmanager
async def pg_autocommit(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A pooled asyncpg connection outside any transaction (each statement commits)."""
    async with engine.connect() as conn:
        yield await driver(conn)


@asynccontextmanager
async def pg_transaction(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A pooled asyncpg connection inside an explicit transaction (the engine's hot path:
    SQLAlchemy's per-statement overhead is larger than the set-based statements' cost)."""
    async with pg_autocommit(engine) as conn, conn.transaction():
        yield conn


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def wait_for_database(engine: AsyncEngine, *, attempts: int = 0) -> None:
    """Block until Postgres answers, retrying with backoff (``attempts=0``: forever)."""
    delay = 0.2
    tried = 0
    while True:
        tried += 1
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return
        except Exception as exc:  # driver raises many unrelated types while down
            if attempts and tried >= attempts:
                raise
            log.warning("Postgres not reachable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
