"""Publishing committed outbox rows to JetStream.

Fast path: the process that committed a decision publishes its step messages right
after the commit (pipelined, ``Nats-Msg-Id`` set) and deletes the rows in the
background. Safety net: the relay publishes rows older than ``outbox_relay_after_s``,
left behind by a process that crashed or lost NATS between commit and publish; it claims
them with ``FOR UPDATE SKIP LOCKED`` so several control planes never fight over them.
A row published twice is harmless: JetStream drops the duplicate ``Nats-Msg-Id`` within
the stream's duplicate window, and results are recorded idempotently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.js import JetStreamContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.tasks import stop_tasks
from agentflow_control_plane import metrics
from agentflow_control_plane.engine.writes import OutMsg, traceparent_for

log = logging.getLogger("agentflow.dispatcher")

PUBLISH_TIMEOUT_S = 5.0


class Dispatcher:
    def __init__(self, js: JetStreamContext, engine: AsyncEngine, *, relay_after_s: float) -> None:
        self._js = js
        self._engine = engine
        self._relay_after_s = relay_after_s
        self._published: list[int] = []
        self._wake_deleter = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._delete_loop(), name="outbox-delete"),
            asyncio.create_task(self._relay_loop(), name="outbox-relay"),
        ]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        await self._delete_published()

    async def publish(self, messages: list[OutMsg]) -> bool:
        """Publish committed messages; on failure leave their rows for the relay."""
        return await self.confirm(messages, await self.send(messages))

    async def _publish_async(self, messages: list[OutMsg]) -> list[asyncio.Future[Any]]:
        """Write the messages to NATS (deduplicated by ``Nats-Msg-Id``); raises on failure."""
        return [
            await self._js.publish_async(
                m.subject, m.body, headers={"Nats-Msg-Id": m.msg_id, "traceparent": m.traceparent}
            )
            for m in messages
        ]

    async def send(self, messages: list[OutMsg]) -> list[asyncio.Future[Any]] | None:
        """Write the messages to NATS without waiting for the stream's acks."""
        if not messages:
            return []
        try:
            return await self._publish_async(messages)
        except Exception as exc:  # NATS down: the relay retries from the outbox
            log.warning("publishing %d step(s) failed (%s); the outbox relay will retry", len(messages), exc)
            return None

    async def confirm(self, messages: list[OutMsg], futures: list[asyncio.Future[Any]] | None) -> bool:
        """Wait for JetStream's acks, then let the rows be deleted."""
        if not messages:
            return True
        if futures is None:
            return False
        try:
            await asyncio.wait_for(asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
        except Exception as exc:  # timeout, stream error: the relay retries from the outbox
            log.warning("publishing %d step(s) failed (%s); the outbox relay will retry", len(messages), exc)
            return False
        metrics.STEPS_DISPATCHED.inc(len(messages))
        self._published.extend(m.outbox_id for m in messages)
        if len(self._published) >= 256:
            self._wake_deleter.set()
        return True

    async def _delete_published(self) -> None:
        if not self._published:
            return
        ids, self._published = self._published, []
        try:
            async with self._engine.begin() as conn:
                await conn.execute(text("DELETE FROM outbox WHERE id = ANY(CAST(:ids AS bigint[]))"), {"ids": ids})
        except Exception as exc:
            # Rows stay; the relay re-publishes them later and JetStream dedupes.
            log.warning("deleting %d published outbox rows failed: %s", len(ids), exc)

    async def _delete_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_deleter.wait(), 0.05)
            self._wake_deleter.clear()
            await self._delete_published()

    async def relay_once(self, limit: int = 1000) -> int:
        """Publish outbox rows older than the relay delay. Returns how many."""
        async with self._engine.begin() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT id, tenant_id, run_id, subject, msg_id, body, traceparent FROM outbox "
                        "WHERE created_at < now() - make_interval(secs => :age) "
                        "ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
                    ),
                    {"age": self._relay_after_s, "limit": limit},
                )
            ).all()
            if not rows:
                return 0
            messages = [
                OutMsg(
                    tenant=r[1],
                    run_id=r[2],
                    subject=r[3],
                    msg_id=r[4],
                    body=bytes(r[5]),
                    traceparent=r[6] or traceparent_for(r[2]),
                    outbox_id=r[0],
                )
                for r in rows
            ]
            # Raises on failure: the transaction rolls back and the rows stay for next time.
            futures = await self._publish_async(messages)
            await asyncio.wait_for(asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
            await conn.execute(
                text("DELETE FROM outbox WHERE id = ANY(CAST(:ids AS bigint[]))"),
                {"ids": [m.outbox_id for m in messages]},
            )
        metrics.STEPS_DISPATCHED.inc(len(messages))
        metrics.OUTBOX_RELAYED.inc(len(messages))
        log.info("outbox relay published %d leftover step message(s)", len(messages))
        return len(messages)

    async def _relay_loop(self) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                count = await self.relay_once()
                delay = 0.05 if count else 1.0
            except Exception as exc:
                log.warning("outbox relay failed (%s); retrying", exc)
                delay = min(max(delay * 2, 1.0), 10.0)
            metrics.RELAY_SECONDS.observe(time.monotonic() - started)
