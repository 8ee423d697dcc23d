"""Tool rate limits shared by every worker: GCRA state in a JetStream KV bucket.

Each key (``<tenant>.<tool>``) holds one number, the GCRA theoretical arrival time;
updates are compare-and-set on the entry's revision, so two workers racing for the last
call of a window cannot both win. The decision itself is the pure
:func:`agentflow_core.rate_limit.gcra`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agentflow_core.rate_limit import gcra
from agentflow_core.tools import RateLimit

_UNSAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")


class KvRateLimiter:
    def __init__(self, kv: KeyValue, clock: Callable[[], float] = time.time, max_tries: int = 50) -> None:
        self.kv = kv
        self.clock = clock
        self.max_tries = max_tries

    async def acquire(self, key: str, limit: RateLimit) -> float:
        kv_key = _UNSAFE.sub("_", key) + f".{limit.count}-{limit.period_s}"
        for _ in range(self.max_tries):
            now = self.clock()
            try:
                entry = await self.kv.get(kv_key)
                tat: float | None = float(entry.value or b"0")
                revision = entry.revision
            except KeyNotFoundError:
                tat, revision = None, None
            decision = gcra(tat, now, limit)
            if not decision.allowed:
                return decision.retry_after_s
            value = repr(decision.new_tat).encode()
            try:
                if revision is None:
                    await self.kv.create(kv_key, value)
                else:
                    await self.kv.update(kv_key, value, last=revision)
                return 0.0
            except KeyWrongLastSequenceError:
                # another worker counted a call in between (create: it made the key
                # first): decide again on what it wrote
                continue
        raise RuntimeError(f"rate limit state for {key} kept changing under us ({self.max_tries} tries)")
