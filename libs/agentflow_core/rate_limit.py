"""GCRA (generic cell rate algorithm): the rate-limit decision as a pure function.

One number of state per key — the theoretical arrival time (TAT) — so a limit shared by
every worker needs only a compare-and-set on one value (the worker keeps it in a NATS
KV bucket). ``100/hour`` admits a burst of up to 100 calls, then one every 36 s: the
same promise as a sliding window, without the double burst of fixed windows at their
boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentflow_core.tools import RateLimit


@dataclass(frozen=True, slots=True)
class GcraDecision:
    allowed: bool
    #: the state to store when allowed (unchanged when refused)
    new_tat: float
    #: seconds until a call would be allowed (0 when allowed)
    retry_after_s: float


def gcra(tat: float | None, now: float, limit: RateLimit) -> GcraDecision:
    """Decide one call at time ``now`` (seconds) given the stored ``tat`` (None: first call)."""
    interval = limit.period_s / limit.count
    burst = limit.period_s - interval  # tolerance: count-1 calls may come early
    base = max(tat if tat is not None else now, now)
    new_tat = base + interval
    allow_at = new_tat - interval - burst
    if allow_at > now:
        return GcraDecision(False, tat if tat is not None else now, allow_at - now)
    return GcraDecision(True, new_tat, 0.0)
