"""Step progress events (LLM token deltas) on core NATS: best effort, never blocking a step."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from nats.aio.client import Client

from agentflow_bus.subjects import Names

log = logging.getLogger("agentflow.worker.progress")


class NatsProgress:
    def __init__(self, nc: Client, names: Names) -> None:
        self.nc = nc
        self.names = names
        self._seq = 0

    async def emit(self, tenant: str, run: str, step: str, attempt: int, kind: str, data: dict[str, Any]) -> None:
        self._seq += 1
        event = {"run": run, "step": step, "attempt": attempt, "kind": kind, "seq": self._seq, "data": data}
        try:
            await self.nc.publish(self.names.progress_subject(tenant, run), orjson.dumps(event))
        except Exception as exc:  # progress is advisory: a lost delta must not fail the step
            log.debug("progress event dropped: %s", exc)
