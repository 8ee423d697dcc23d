"""The workers list: read from the heartbeat bucket the workers write to."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import orjson
from nats.js.errors import BucketNotFoundError, NoKeysError

from agentflow_control_plane.api.schemas import WorkerOut
from agentflow_control_plane.state import AppState
from agentflow_core.errors import Unavailable


async def list_workers(state: AppState) -> list[WorkerOut]:
    if state.nc is None or not state.nc.is_connected:
        raise Unavailable("the control plane is not connected to NATS yet")
    js = state.nc.jetstream()
    try:
        kv = await js.key_value(state.names.workers_bucket)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError):
        return []  # no worker has ever started (or all expired)
    now = time.time()
    out: list[WorkerOut] = []
    for key in sorted(keys):
        try:
            entry = await kv.get(key)
            beat = orjson.loads(entry.value or b"{}")
            last_seen = float(beat["last_seen"])
            out.append(
                WorkerOut(
                    id=str(beat["id"]),
                    version=str(beat.get("version", "")),
                    queues=[str(q) for q in beat.get("queues", [])],
                    concurrency=int(beat.get("concurrency", 0)),
                    in_flight=int(beat.get("in_flight", 0)),
                    agent_types=[str(t) for t in beat.get("agent_types", [])],
                    started_at=datetime.fromtimestamp(float(beat["started_at"]), UTC),
                    last_seen=datetime.fromtimestamp(last_seen, UTC),
                    alive=now - last_seen < state.settings.worker_dead_after_s,
                )
            )
        except Exception:
            continue  # expired between keys() and get(), or written by a newer version
    return out
