"""Real Postgres and NATS for the test session.

Order of preference, for each: the ``AGENTFLOW_TEST_DATABASE_URL`` /
``AGENTFLOW_TEST_NATS_URL`` variables; a server already listening on the default local
port (127.0.0.1:5432 with trust auth, 127.0.0.1:4222 with JetStream); otherwise the
embedded servers from the ``embedded`` extra, started in a temporary directory. Each
test environment gets its own fresh database and its own subject/stream prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats

from agentflow_cli.embedded import EmbeddedNats, EmbeddedPostgres
from agentflow_control_plane.db.migrate import upgrade


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Services:
    admin_database_url: str
    nats_url: str
    embedded: list[Any] = field(default_factory=list)

    @classmethod
    def discover(cls) -> Services:
        embedded: list[Any] = []
        home = Path(tempfile.mkdtemp(prefix="agentflow-test-"))
        (home / "logs").mkdir()
        # AGENTFLOW_TEST_EMBEDDED=1 ignores local servers: what a fresh machine does.
        force_embedded = os.environ.get("AGENTFLOW_TEST_EMBEDDED") == "1"
        db = os.environ.get("AGENTFLOW_TEST_DATABASE_URL")
        if not db:
            if _listening("127.0.0.1", 5432) and not force_embedded:
                db = "postgresql://postgres@127.0.0.1:5432/postgres"
            else:
                pg = EmbeddedPostgres(home)
                db = pg.start("postgres")
                embedded.append(pg)
        nats_url = os.environ.get("AGENTFLOW_TEST_NATS_URL")
        if not nats_url:
            if _listening("127.0.0.1", 4222) and not force_embedded:
                nats_url = "nats://127.0.0.1:4222"
            else:
                server = EmbeddedNats(home)
                nats_url = server.start()
                embedded.append(server)
        return cls(db, nats_url, embedded)

    def close(self) -> None:
        for server in reversed(self.embedded):
            server.stop()


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/{name}" + (f"?{query}" if query else "")


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@dataclass
class TestEnv:
    """A fresh database (migrated) and NATS prefix: an isolated AgentFlow installation."""

    __test__ = False  # not a test class, despite the name

    services: Services
    database: str
    prefix: str
    secret: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def database_url(self) -> str:
        return _with_database(self.services.admin_database_url, self.database)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFLOW_")}
        env.update(
            AGENTFLOW_DATABASE_URL=self.database_url,
            AGENTFLOW_NATS_URL=self.services.nats_url,
            AGENTFLOW_NATS_PREFIX=self.prefix,
            AGENTFLOW_JWT_SECRET=self.secret,
            AGENTFLOW_LOG_LEVEL="warning",
        )
        env.update(extra)
        return env

    @classmethod
    def create(cls, services: Services) -> TestEnv:
        tag = secrets.token_hex(4)
        env = cls(services, f"agentflow_test_{tag}", f"t{tag}")
        asyncio.run(env._create_database())
        upgrade(env.database_url)
        return env

    async def _create_database(self) -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(self.services.admin_database_url))
        try:
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    def destroy(self) -> None:
        asyncio.run(self._destroy())

    async def _destroy(self) -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(self.services.admin_database_url))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()
        nc = await nats.connect(self.services.nats_url)
        try:
            js = nc.jetstream()
            token = self.prefix.upper()
            for suffix in ("STEPS", "RESULTS"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(f"{token}_{suffix}")
        finally:
            await nc.close()

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(_asyncpg_dsn(self.database_url))
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    def query(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return asyncio.run(self.sql(query, *args))
