"""Worker registration: a heartbeat entry per worker in a JetStream KV bucket.

Entries expire on their own (bucket TTL), so a crashed worker disappears from
``GET /v1/workers`` without anyone cleaning up; a drained worker deletes its entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from nats.js.kv import KeyValue

from agentflow_bus.tasks import stop_task

log = logging.getLogger("agentflow.worker.heartbeat")


class Heartbeat:
    def __init__(self, kv: KeyValue, key: str, interval_s: float, describe: Callable[[], dict[str, Any]]) -> None:
        self.kv = kv
        self.key = key
        self.interval_s = interval_s
        self.describe = describe
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        body = {**self.describe(), "last_seen": time.time()}
        await self.kv.put(self.key, orjson.dumps(body))

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="heartbeat")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except Exception as exc:  # NATS blip: the next beat retries
                log.warning("heartbeat failed: %s", exc)

    async def stop(self) -> None:
        await stop_task(self._task)
        with contextlib.suppress(Exception):
            await self.kv.delete(self.key)
