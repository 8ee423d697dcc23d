"""Steps JetStream gave up on: delivered ``AGENTFLOW_STEP_MAX_DELIVER`` times without an ack.

That happens when every worker that took the step died or lost it (a step that crashes
its worker, say). JetStream then stops delivering it and emits a max-deliveries
advisory. Without this watch the step would stay ``running`` forever; with it, the
control plane answers the step itself with a failed result, which goes through the
normal result path (verification, retries, ``on_error``). The synthetic result is
published with a ``Nats-Msg-Id`` derived from the step, so when several control planes
see the advisory, JetStream keeps one.

Advisories are plain NATS messages, not stored: one emitted while no control plane is
connected is missed (see the closing notes of the foundation issue).
"""

from __future__ import annotations

import logging
import time

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agentflow_bus.subjects import Names
from agentflow_core.envelope import ENVELOPE_VERSION, check_step, open_envelope, seal
from agentflow_core.errors import EnvelopeRejected

log = logging.getLogger("agentflow.stalled")


class StalledStepWatch:
    def __init__(self, nc: Client, js: JetStreamContext, names: Names) -> None:
        self._nc = nc
        self._js = js
        self._names = names

    async def start(self) -> None:
        await self._nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self._names.steps_stream}.*", cb=self._on_advisory
        )

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = orjson.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
            stored = await self._js.get_msg(self._names.steps_stream, seq)
        except Exception as exc:  # already handled by another control plane, or gone
            log.info("max-deliveries advisory not actionable: %s", exc)
            return
        try:
            body, digest = open_envelope(stored.data or b"")
            step = check_step(body)
        except EnvelopeRejected as exc:
            log.warning("undeliverable step message at seq %d is not a valid envelope: %s", seq, exc.message)
            return
        now = time.time_ns() // 1000
        result = {
            "v": ENVELOPE_VERSION,
            "kind": "result",
            "tenant": step["tenant"],
            "run": step["run"],
            "step": step["step"],
            "attempt": step["attempt"],
            "step_hash": digest,
            "status": "failed",
            "output": None,
            "error": f"no worker finished the step in {deliveries} deliveries (workers crashed or lost it)",
            "worker": "control-plane",
            "delivery": deliveries,
            "started_us": now,
            "finished_us": now,
        }
        wire, _ = seal(result)
        await self._js.publish(
            self._names.result_subject(step["tenant"]),
            wire,
            headers={"Nats-Msg-Id": f"stalled:{step['step']}:{step['attempt']}"},
        )
        try:
            await self._js.delete_msg(self._names.steps_stream, seq)
        except Exception as exc:  # another control plane deleted it first
            log.debug("deleting undeliverable step message %d: %s", seq, exc)
        log.warning("step %s attempt %d failed after %d deliveries", step["step"], step["attempt"], deliveries)
