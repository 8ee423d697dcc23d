"""Tool rate limits hold across workers: two NATS connections race for one tenant's budget."""

from __future__ import annotations

import asyncio
import secrets

import nats

from agentflow_bus.kv import ensure_bucket
from agentflow_core.tools import parse_rate_limit
from agentflow_worker.tools.ratelimit import KvRateLimiter
from tests.support.services import Services


async def test_two_workers_share_one_limit(services: Services) -> None:
    bucket = f"rl_test_{secrets.token_hex(4)}"
    conns = [await nats.connect(services.nats_url) for _ in range(2)]
    try:
        limiters = [KvRateLimiter(await ensure_bucket(nc.jetstream(), bucket, ttl_s=600)) for nc in conns]
        limit = parse_rate_limit("5/hour")
        # 30 concurrent calls split over both "workers": exactly 5 may pass.
        waits = await asyncio.gather(*(limiters[i % 2].acquire("acme.search", limit) for i in range(30)))
        assert sum(1 for w in waits if w == 0) == 5
        refused = [w for w in waits if w > 0]
        assert len(refused) == 25
        assert all(0 < w <= 720 for w in refused)  # one call per 12 minutes after the burst
        # Another tenant (another key) has its own budget.
        assert await limiters[0].acquire("other.search", limit) == 0
    finally:
        await conns[0].jetstream().delete_key_value(bucket)
        for nc in conns:
            await nc.close()
