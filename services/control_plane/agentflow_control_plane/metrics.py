"""Prometheus metrics of the control plane. Labels never carry run or step ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

STEPS_DISPATCHED = Counter("agentflow_steps_dispatched_total", "Step messages published to JetStream")
STEPS_COMPLETED = Counter("agentflow_steps_completed_total", "Steps that finished successfully")
STEPS_FAILED = Counter(
    "agentflow_steps_failed_total",
    "Step attempts that failed, timed out or were rejected",
    ["reason"],
)
STEP_RETRIES = Counter("agentflow_step_retries_total", "Step attempts scheduled after a failure")
RUNS_FINISHED = Counter("agentflow_runs_finished_total", "Runs that reached a final status", ["status"])
STEP_LATENCY = Histogram(
    "agentflow_step_latency_seconds",
    "From dispatch of a step attempt to its result committed",
    buckets=(
        0.001,
        0.002,
        0.003,
        0.005,
        0.0075,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
    ),
)
RESULTS_BATCH = Histogram(
    "agentflow_results_batch_size",
    "Result messages committed per transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
RESULTS_REJECTED = Counter("agentflow_results_rejected_total", "Result messages refused on receipt", ["reason"])
OUTBOX_RELAYED = Counter("agentflow_outbox_relayed_total", "Outbox rows published by the relay")
RELAY_SECONDS = Histogram("agentflow_outbox_relay_seconds", "Duration of one relay pass")
HTTP_LATENCY = Histogram(
    "agentflow_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
