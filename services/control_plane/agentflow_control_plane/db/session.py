"""The async SQLAlchemy engine and session factory of one process."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

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
    """The asyncpg connection under a SQLAlchemy one, inside the same transaction.

    The engine's hot path sends set-based statements straight to asyncpg: SQLAlchemy's
    per-statement overhead is larger than the statements' own cost there.
    """
    raw = await conn.get_raw_connection()
    connection: asyncpg.Connection = raw.driver_connection  # type: ignore[assignment]
    return connection


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
