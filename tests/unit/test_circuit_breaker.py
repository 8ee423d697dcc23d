"""The per-host circuit breaker's state machine, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from agentflow_worker.agents.base import AgentError
from agentflow_worker.agents.circuit import BreakerRegistry, CircuitBreaker, CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(b: CircuitBreaker) -> str:
    # a function, so the type checker does not narrow the property between calls
    return b.state


def breaker(clock: Clock, threshold: int = 3, cooldown: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker("api.example.com:443", failure_threshold=threshold, cooldown_s=cooldown, clock=clock)


def test_defaults_are_class_params() -> None:
    b = CircuitBreaker("h")
    assert (b.failure_threshold, b.cooldown_s) == (5, 30.0)

    class Touchy(CircuitBreaker):
        failure_threshold = 1

    assert Touchy("h").failure_threshold == 1
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("h", failure_threshold=0)


def test_opens_after_threshold_consecutive_failures_only() -> None:
    clock = Clock()
    b = breaker(clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success in between resets the count
    b.record_failure()
    b.record_failure()
    assert state(b) == "closed"
    assert b.acquire() is False
    b.record_failure()
    assert state(b) == "open"
    with pytest.raises(CircuitOpen) as info:
        b.acquire()
    assert str(info.value) == (
        "circuit open for host api.example.com:443 after 3 consecutive failures; next probe in 30s"
    )
    assert isinstance(info.value, AgentError)  # a step failure, not a crash


def test_message_counts_down_the_cooldown() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1, cooldown=30)
    b.record_failure()
    clock.now += 25.55
    with pytest.raises(CircuitOpen, match=r"next probe in 4\.5s"):
        b.acquire()


def test_half_open_lets_exactly_one_probe_through_then_closes_on_success() -> None:
    clock = Clock()
    b = breaker(clock, threshold=2, cooldown=10)
    b.record_failure()
    b.record_failure()
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        b.acquire()
    clock.now += 0.1
    assert state(b) == "half_open"
    assert b.acquire() is True  # the probe
    for _ in range(3):
        with pytest.raises(CircuitOpen, match=r"half-open .* a probe request is in flight"):
            b.acquire()
    b.record_success()
    assert state(b) == "closed"
    assert b.failures == 0
    assert b.acquire() is False
    assert b.acquire() is False


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    b = breaker(clock, threshold=2, cooldown=10)
    b.record_failure()
    b.record_failure()
    clock.now += 10
    assert b.acquire() is True
    clock.now += 2  # the probe took 2 s to fail
    b.record_failure()
    assert state(b) == "open"
    with pytest.raises(CircuitOpen, match=r"after 3 consecutive failures; next probe in 10s"):
        b.acquire()
    clock.now += 10
    assert b.acquire() is True  # next probe


def test_an_abandoned_probe_lets_the_next_caller_probe() -> None:
    clock = Clock()
    b = breaker(clock, threshold=1, cooldown=5)
    b.record_failure()
    clock.now += 5
    assert b.acquire() is True
    b.abandon(probe=True)  # e.g. the step was cancelled mid-request
    assert b.acquire() is True
    b.abandon(probe=False)  # a non-probe abandon changes nothing
    with pytest.raises(CircuitOpen, match="probe request is in flight"):
        b.acquire()


def test_registry_keeps_one_breaker_per_host_with_shared_settings() -> None:
    clock = Clock()
    registry = BreakerRegistry(failure_threshold=2, cooldown_s=1, clock=clock)
    a = registry.get("a:443")
    assert registry.get("a:443") is a
    assert "a:443" in registry and "b:443" not in registry
    a.record_failure()
    a.record_failure()
    assert state(a) == "open"
    b = registry.get("b:443")
    assert state(b) == "closed"  # other hosts are unaffected
    assert (b.failure_threshold, b.cooldown_s) == (2, 1)
    clock.now += 1
    assert state(a) == "half_open"
