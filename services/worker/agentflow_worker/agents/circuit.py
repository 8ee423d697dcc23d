"""Per-host circuit breakers: stop calling a host that keeps failing, probe it now and then.

States: *closed* (calls go through; consecutive failures are counted) → *open* after
``failure_threshold`` consecutive failures (calls fail fast, nothing is sent) → after
``cooldown_s`` *half-open*: exactly one probe call goes through while every other call
still fails fast → closed again if the probe succeeds, open for another cooldown if it
fails.

Pure logic: time comes from an injectable ``clock`` (monotonic seconds), so the state
machine is tested without sleeping. One :class:`BreakerRegistry` per worker process
(kept in ``WorkerServices.shared``) means one host failing trips one breaker for every
step of that worker. Everything runs on the worker's event loop, so no locking.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

from agentflow_worker.agents.base import AgentError

State = Literal["closed", "open", "half_open"]


class CircuitOpen(AgentError):
    """The host's breaker refused the call: nothing was sent."""


class CircuitBreaker:
    failure_threshold: int = 5
    cooldown_s: float = 30.0

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int | None = None,
        cooldown_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        if failure_threshold is not None:
            self.failure_threshold = failure_threshold
        if cooldown_s is not None:
            self.cooldown_s = cooldown_s
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.cooldown_s < 0:
            raise ValueError("cooldown_s must not be negative")
        self.clock = clock
        self.failures = 0
        self._opened_at = 0.0
        self._state: State = "closed"
        self._probe_in_flight = False

    @property
    def state(self) -> State:
        """The state as of now (an open breaker whose cooldown has passed reads half-open)."""
        if self._state == "open" and self.clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return self._state

    def acquire(self) -> bool:
        """Ask to make one call. Returns True when this call is the half-open probe (its
        outcome decides the state); raises :class:`CircuitOpen` when the call may not go."""
        state = self.state
        if state == "closed":
            return False
        if state == "half_open" and not self._probe_in_flight:
            self._state = "half_open"
            self._probe_in_flight = True
            return True
        if state == "half_open":
            raise CircuitOpen(
                f"circuit half-open for host {self.name} after {self.failures} consecutive failures; "
                "a probe request is in flight, this call was not sent"
            )
        wait = max(0.0, self.cooldown_s - (self.clock() - self._opened_at))
        raise CircuitOpen(
            f"circuit open for host {self.name} after {self.failures} consecutive failures; "
            f"next probe in {_seconds(wait)}"
        )

    def record_success(self) -> None:
        self.failures = 0
        self._state = "closed"
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self.failures += 1
        if self._state == "half_open" or self.failures >= self.failure_threshold:
            self._state = "open"
            self._opened_at = self.clock()
        self._probe_in_flight = False

    def abandon(self, probe: bool) -> None:
        """A call ended without a verdict (cancelled, or failed for a reason of our own):
        if it was the probe, the next caller may probe instead."""
        if probe:
            self._probe_in_flight = False


def _seconds(value: float) -> str:
    if value >= 10:
        return f"{math.ceil(value)}s"
    return f"{math.ceil(value * 10) / 10:.1f}s"


class BreakerRegistry:
    """One breaker per host key (``host:port``), created on first use with shared settings."""

    def __init__(
        self,
        *,
        failure_threshold: int = CircuitBreaker.failure_threshold,
        cooldown_s: float = CircuitBreaker.cooldown_s,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, host: str) -> CircuitBreaker:
        breaker = self._breakers.get(host)
        if breaker is None:
            breaker = CircuitBreaker(
                host, failure_threshold=self.failure_threshold, cooldown_s=self.cooldown_s, clock=self.clock
            )
            self._breakers[host] = breaker
        return breaker

    def __contains__(self, host: str) -> bool:
        return host in self._breakers
