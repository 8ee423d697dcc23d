"""Prometheus metrics of a worker. Labels never carry run or step ids."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("agentflow_worker_steps_total", "Steps executed", ["agent_type", "status"])
REJECTED = Counter("agentflow_worker_steps_rejected_total", "Step messages refused on receipt", ["reason"])
INFLIGHT = Gauge("agentflow_worker_inflight_steps", "Steps currently executing")
CONCURRENCY = Gauge("agentflow_worker_concurrency", "Steps this worker runs at once at most (its capacity)", ["queue"])
DURATION = Histogram(
    "agentflow_worker_step_duration_seconds",
    "Agent execution time",
    ["agent_type"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)
