"""JetStream key-value buckets the processes share (worker heartbeats, rate limits)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue


async def ensure_bucket(js: JetStreamContext, bucket: str, *, ttl_s: float, replicas: int = 1) -> KeyValue:
    """Open ``bucket``, creating it (entries expire ``ttl_s`` after their last write) if missing."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=ttl_s, replicas=replicas))
    except Exception:
        # Another process created it between our two calls.
        return await js.key_value(bucket)
