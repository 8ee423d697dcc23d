"""The async SQLAlchemy engine and session factory of one process."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger("agentflow.db")


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        # JSON columns go through orjson-compatible stdlib json; keep defaults.
    )


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
