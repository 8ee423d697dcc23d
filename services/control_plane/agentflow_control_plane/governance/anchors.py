"""External anchors: each tenant's chain head, published where the database cannot reach.

On a schedule, every head that moved since its last anchor is published to a JetStream
stream created with ``deny_delete`` and ``deny_purge`` (messages cannot be removed through
the NATS API), and optionally appended to a JSON-lines file. Someone who rewrites the
``audits`` table consistently (recomputing every hash) still cannot match the anchored
hash at the anchored seq, so verification against the last anchor catches it.

Several control planes may run this loop: anchors carry ``Nats-Msg-Id``
``anchor:<tenant>:<seq>``, so JetStream keeps one copy of each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.subjects import Names
from agentflow_bus.tasks import stop_task
from agentflow_control_plane.db.session import pg_autocommit
from agentflow_core.audit import format_ts

log = logging.getLogger("agentflow.audit.anchors")


async def ensure_anchor_stream(js: JetStreamContext, names: Names, replicas: int = 1) -> None:
    config = StreamConfig(
        name=names.audit_anchor_stream,
        subjects=[names.audit_anchor_filter],
        storage=StorageType.FILE,
        num_replicas=replicas,
        deny_delete=True,
        deny_purge=True,
        # Keep everything: anchors are small and only written when a head moved.
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        duplicate_window=120.0,
    )
    try:
        await js.stream_info(names.audit_anchor_stream)
    except NotFoundError:
        await js.add_stream(config)


async def last_anchor(js: JetStreamContext, names: Names, tenant: str) -> dict[str, Any] | None:
    """The newest anchor published for ``tenant`` (``{tenant, seq, hash, ts}``), if any."""
    try:
        msg = await js.get_last_msg(names.audit_anchor_stream, names.audit_anchor_subject(tenant))
    except NotFoundError:
        return None
    if msg.data is None:
        return None
    anchor: dict[str, Any] = orjson.loads(msg.data)
    return anchor


class AnchorPublisher:
    def __init__(
        self,
        js: JetStreamContext,
        engine: AsyncEngine,
        names: Names,
        *,
        interval_s: float,
        file: str = "",
        replicas: int = 1,
    ) -> None:
        self._js = js
        self._engine = engine
        self._names = names
        self._interval_s = interval_s
        self._file = Path(file) if file else None
        self._replicas = replicas
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await ensure_anchor_stream(self._js, self._names, self._replicas)
        if self._interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="audit-anchors")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def anchor_once(self) -> int:
        """Publish every head that moved since its last anchor. Returns how many."""
        async with pg_autocommit(self._engine) as conn:
            heads = await conn.fetch("SELECT tenant_id, seq, hash FROM audit_heads WHERE seq > anchored_seq")
            for tenant, seq, digest in heads:
                anchor = {
                    "tenant": tenant,
                    "seq": int(seq),
                    "hash": digest,
                    "ts": format_ts(datetime.now(UTC)),
                }
                body = orjson.dumps(anchor)
                await self._js.publish(
                    self._names.audit_anchor_subject(tenant),
                    body,
                    headers={"Nats-Msg-Id": f"anchor:{tenant}:{seq}"},
                )
                if self._file is not None:
                    with self._file.open("ab") as out:
                        out.write(body + b"\n")
                # Only forward: another process may have anchored a later head already.
                await conn.execute(
                    "UPDATE audit_heads SET anchored_seq = $2 WHERE tenant_id = $1 AND anchored_seq < $2", tenant, seq
                )
        return len(heads)

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                count = await self.anchor_once()
                if count:
                    log.info("anchored %d audit chain head(s)", count)
            except Exception as exc:  # NATS or Postgres away: try again next round
                log.warning("anchoring audit chain heads failed (%s)", exc)
            await asyncio.sleep(max(0.0, self._interval_s - (time.monotonic() - started)))
