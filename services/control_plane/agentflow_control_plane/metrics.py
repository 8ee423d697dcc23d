"""Prometheus metrics of the control plane. Labels never carry run or step ids."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

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
LLM_TOKENS = Counter(
    "agentflow_llm_tokens_total",
    "LLM tokens recorded in the cost ledger",
    ["tenant", "model", "kind"],
)
SPEND_USD = Counter(
    "agentflow_spend_usd_total",
    "Dollars recorded in the cost ledger (LLM calls by model, tool calls as 'tool')",
    ["tenant", "model"],
)
BUDGET_EVENTS = Counter(
    "agentflow_budget_events_total",
    "Budget decisions: warnings of soft budgets, refusals and stops of hard ones",
    ["tenant", "event"],
)
AUDIT_ENTRIES = Counter("agentflow_audit_entries_total", "Entries appended to audit chains")
EVENT_STREAM_CONNECTIONS = Gauge(
    "agentflow_event_stream_connections",
    "Open run-event streams (WebSocket and Server-Sent Events) on this control plane",
    ["transport", "scope"],
)

#: Distinct (tenant, model) label pairs kept; later pairs are counted under model="other"
#: so a tenant cycling through model names cannot grow the series without bound.
MAX_SPEND_SERIES = 500
_spend_series: set[tuple[str, str]] = set()


def spend_labels(tenant: str, model: str) -> tuple[str, str]:
    key = (tenant, model)
    if key in _spend_series:
        return key
    if len(_spend_series) < MAX_SPEND_SERIES:
        _spend_series.add(key)
        return key
    return tenant, "other"


def record_spend(ledger_rows: list[tuple[Any, ...]]) -> None:
    """Count a committed batch's ledger rows (see ``WriteSet.ledger`` for the layout)."""
    for row in ledger_rows:
        tenant, kind, name = str(row[0]), row[6], str(row[9])
        model = name if kind == "llm" else "tool"
        labels = spend_labels(tenant, model)
        if kind == "llm":
            LLM_TOKENS.labels(*labels, "prompt").inc(int(row[10]))
            LLM_TOKENS.labels(*labels, "completion").inc(int(row[11]))
        SPEND_USD.labels(*labels).inc(float(str(row[12])))
