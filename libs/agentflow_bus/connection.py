"""Connecting to NATS with retries and declaring streams and consumers idempotently."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from agentflow_bus.settings import BusSettings
from agentflow_bus.subjects import Names

log = logging.getLogger("agentflow.bus")


async def connect(settings: BusSettings, *, name: str, attempts: int = 0) -> Client:
    """Connect to NATS, retrying with backoff; ``attempts=0`` retries forever.

    Once connected, nats-py reconnects on its own (forever) after outages.
    """
    delay = 0.2
    tried = 0
    while True:
        tried += 1
        try:
            nc: Client = await nats.connect(
                settings.nats_url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                allow_reconnect=True,
                pending_size=64 * 1024 * 1024,
            )
            return nc
        except Exception as exc:  # nats raises several unrelated types here
            if attempts and tried >= attempts:
                raise
            log.warning("NATS at %s not reachable (%s); retrying in %.1fs", settings.nats_url, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _add_or_update_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with a different config (e.g. replicas changed): update in place.
        await js.update_stream(config)


async def ensure_streams(js: JetStreamContext, settings: BusSettings) -> None:
    names = Names(settings.nats_prefix)
    common: dict[str, Any] = {
        "retention": RetentionPolicy.WORK_QUEUE,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.OLD,
        # Window inside which a re-published Nats-Msg-Id is dropped as a duplicate.
        "duplicate_window": 120.0,
        "num_replicas": settings.stream_replicas,
    }
    await _add_or_update_stream(
        js,
        StreamConfig(name=names.steps_stream, subjects=[f"{settings.nats_prefix}.steps.>"], **common),
    )
    await _add_or_update_stream(js, StreamConfig(name=names.results_stream, subjects=[names.results_filter], **common))


async def ensure_consumer(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subject: str,
    ack_wait: float,
    max_deliver: int,
    max_ack_pending: int = 20_000,
) -> None:
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        filter_subject=filter_subject,
        max_ack_pending=max_ack_pending,
        max_waiting=512,
    )
    await js.add_consumer(stream, config)
