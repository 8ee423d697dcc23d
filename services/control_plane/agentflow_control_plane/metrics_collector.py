"""Gauges the control plane refreshes on a timer: queues, workers, budgets, audit chains.

Reading JetStream and Postgres on every scrape would make each Prometheus scrape (and
every extra Prometheus) cost API calls and queries; instead one loop per control plane
reads them every ``AGENTFLOW_METRICS_COLLECT_INTERVAL_S`` and ``/metrics`` serves the last
values. Several control planes each export the same gauges (they are states, not
counts): aggregate them with ``max`` across instances, never ``sum``.

Each source is collected on its own: NATS being away leaves the budget gauges fresh, and
a failing source keeps its last values (``agentflow_metrics_collector_last_success_timestamp_seconds``
tells how old they are).

Label cardinality is bounded everywhere: queues and workers by :data:`MAX_QUEUES` /
:data:`MAX_WORKERS` (the rest are folded into ``"(other)"``, a name no queue can have),
budgets and audit chains by :data:`MAX_BUDGETS` / :data:`MAX_TENANTS`. Per-run budget
windows are never exported.

Queue depth and ages come from JetStream's view of the steps stream, a work-queue stream
(a message leaves it when acknowledged):

* ``depth`` = the consumer's ``num_pending`` (not delivered yet) + ``num_ack_pending``
  (delivered, not acknowledged: running, or waiting for redelivery);
* the oldest *pending* message is the first one of the queue after the consumer's
  ``delivered`` stream sequence; the oldest *unacked* one is the first after its
  ``ack_floor`` (everything up to the floor is acknowledged, so the first message of the
  queue past it cannot be). Their publish times come from the stream's get-message API,
  asked only when those sequences moved since the last round;
* a queue with messages but no consumer yet (no worker ever consumed it, e.g. a typo in
  a workflow's ``queue``) is found through the stream's per-subject counts, read only
  when the stream holds more messages than the consumers account for (then every sixth
  round until such a queue is found, every round while one exists).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge

from agentflow_bus.tasks import stop_task
from agentflow_control_plane.db.session import pg_autocommit
from agentflow_control_plane.governance.budgets import budget_from_row, window_key
from agentflow_control_plane.services import worker_registry
from agentflow_control_plane.state import AppState

log = logging.getLogger("agentflow.metrics")

#: step queues exported by name; more are summed into queue="(other)"
MAX_QUEUES = 200
#: workers exported by name (live ones only); more are summed into worker="(other)"
MAX_WORKERS = 500
#: tenant/workflow/agent budgets exported (in tenant, name order)
MAX_BUDGETS = 1000
#: tenants whose audit chain length is exported (in tenant order)
MAX_TENANTS = 1000
#: label value for what is over a cap (parentheses are not allowed in queue names)
OTHER = "(other)"
#: JetStream's page size for consumer listings
_CONSUMER_PAGE = 256
#: most get-message calls per round (a queue whose oldest message is not looked up shows
#: age 0 that round); in steady state unchanged sequences are answered from the cache
MAX_LOOKUPS = 2 * MAX_QUEUES + 2

QUEUE_DEPTH = Gauge(
    "agentflow_queue_depth",
    "Step messages of a queue not yet acknowledged by a worker (waiting + delivered and unfinished)",
    ["queue"],
)
QUEUE_ACK_PENDING = Gauge(
    "agentflow_queue_ack_pending",
    "Step messages of a queue delivered to a worker and not acknowledged yet (running or awaiting redelivery)",
    ["queue"],
)
QUEUE_REDELIVERED = Gauge(
    "agentflow_queue_redelivered",
    "Unacknowledged step messages of a queue that were delivered more than once",
    ["queue"],
)
QUEUE_OLDEST_PENDING = Gauge(
    "agentflow_queue_oldest_pending_age_seconds",
    "Age of the oldest step message of a queue no worker has taken yet (0 when none waits)",
    ["queue"],
)
QUEUE_OLDEST_UNACKED = Gauge(
    "agentflow_queue_oldest_unacked_age_seconds",
    "Age of the oldest step message of a queue not acknowledged yet, running ones included (0 when none)",
    ["queue"],
)
QUEUE_WORKERS = Gauge("agentflow_queue_workers", "Live workers consuming a queue (from their heartbeats)", ["queue"])
RESULTS_DEPTH = Gauge("agentflow_results_queue_depth", "Result messages the control planes have not acknowledged yet")
RESULTS_OLDEST_PENDING = Gauge(
    "agentflow_results_oldest_pending_age_seconds",
    "Age of the oldest result message no control plane has taken yet (0 when none waits)",
)
WORKER_INFLIGHT = Gauge(
    "agentflow_worker_heartbeat_inflight_steps",
    "Steps a live worker reported running in its last heartbeat",
    ["worker", "queue"],
)
WORKER_CONCURRENCY = Gauge(
    "agentflow_worker_heartbeat_concurrency",
    "Steps a live worker can run at once, from its last heartbeat",
    ["worker", "queue"],
)
BUDGET_REMAINING_USD = Gauge(
    "agentflow_budget_remaining_usd",
    "Dollars left in a budget's current day/month window (limit - spent - reserved; negative when overspent)",
    ["tenant", "budget"],
)
BUDGET_REMAINING_TOKENS = Gauge(
    "agentflow_budget_remaining_tokens",
    "Tokens left in a budget's current day/month window (limit - spent - reserved)",
    ["tenant", "budget"],
)
BUDGET_LIMIT_USD = Gauge("agentflow_budget_limit_usd", "A budget's dollar limit per window", ["tenant", "budget"])
BUDGET_LIMIT_TOKENS = Gauge("agentflow_budget_limit_tokens", "A budget's token limit per window", ["tenant", "budget"])
AUDIT_CHAIN_LENGTH = Gauge("agentflow_audit_chain_length", "Entries sealed into a tenant's audit chain", ["tenant"])
AUDIT_UNSEALED = Gauge("agentflow_audit_unsealed_entries", "Audit entries queued and not sealed into a chain yet")
AUDIT_UNSEALED_AGE = Gauge(
    "agentflow_audit_unsealed_oldest_age_seconds", "Age of the oldest audit entry not sealed yet (0 when none)"
)
COLLECT_ERRORS = Counter(
    "agentflow_metrics_collector_errors_total", "Rounds in which a metrics source could not be read", ["source"]
)
COLLECT_LAST_SUCCESS = Gauge(
    "agentflow_metrics_collector_last_success_timestamp_seconds",
    "Unix time of the last round that read a metrics source",
    ["source"],
)

#: a round of one source that takes longer than this is given up (counted as an error)
SOURCE_TIMEOUT_S = 10.0

Labels = tuple[str, ...]


class _Series:
    """One gauge's label sets of the last round, so vanished ones are removed."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.current: set[Labels] = set()

    def replace(self, values: dict[Labels, float]) -> None:
        # No await in here: a scrape (same event loop) sees the old set or the new one.
        for gone in self.current - values.keys():
            self.gauge.remove(*gone)
        for labels, value in values.items():
            self.gauge.labels(*labels).set(value)
        self.current = set(values)


def cap_labels(names: Iterable[str], cap: int) -> dict[str, str]:
    """Each name -> its label value: the first ``cap`` in sorted order keep theirs."""
    ordered = sorted(set(names))
    return {name: name if i < cap else OTHER for i, name in enumerate(ordered)}


@dataclass(slots=True)
class QueueState:
    depth: int = 0
    ack_pending: int = 0
    redelivered: int = 0
    oldest_pending_s: float = 0.0
    oldest_unacked_s: float = 0.0

    def merge(self, other: QueueState) -> None:
        self.depth += other.depth
        self.ack_pending += other.ack_pending
        self.redelivered += other.redelivered
        self.oldest_pending_s = max(self.oldest_pending_s, other.oldest_pending_s)
        self.oldest_unacked_s = max(self.oldest_unacked_s, other.oldest_unacked_s)


class MetricsCollector:
    def __init__(self, state: AppState, *, interval_s: float) -> None:
        self._state = state
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        #: (stream, subject filter, first stream seq) -> publish time of the first message
        #: at or after it; kept for one round, so it holds only what the last round used
        self._times: dict[tuple[str, str, int], datetime | None] = {}
        self._lookups_left = MAX_LOOKUPS
        #: when the steps stream's subjects were last listed, and whether that found queues
        #: without a consumer
        self._listed_at = -1e9
        self._orphans_seen = False
        self._queues = {g: _Series(g) for g in (QUEUE_DEPTH, QUEUE_ACK_PENDING, QUEUE_REDELIVERED,
                                                 QUEUE_OLDEST_PENDING, QUEUE_OLDEST_UNACKED)}  # fmt: skip
        self._workers = {g: _Series(g) for g in (WORKER_INFLIGHT, WORKER_CONCURRENCY, QUEUE_WORKERS)}
        self._budgets = {g: _Series(g) for g in (BUDGET_REMAINING_USD, BUDGET_REMAINING_TOKENS, BUDGET_LIMIT_USD,
                                                  BUDGET_LIMIT_TOKENS)}  # fmt: skip
        self._chains = _Series(AUDIT_CHAIN_LENGTH)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="metrics-collector")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.collect_once()
            await asyncio.sleep(max(0.05, self._interval_s - (time.monotonic() - started)))

    async def collect_once(self) -> None:
        """Read every source once; a failing source is counted and keeps its last values."""
        sources = {"queues": self._collect_queues, "workers": self._collect_workers,
                   "budgets": self._collect_budgets, "audit": self._collect_audit}  # fmt: skip
        for source, read in sources.items():
            try:
                async with asyncio.timeout(SOURCE_TIMEOUT_S):
                    await read()
            except Exception as exc:  # NATS or Postgres away, or a timeout: next round retries
                COLLECT_ERRORS.labels(source).inc()
                log.debug("metrics source %s failed: %r", source, exc)
            else:
                COLLECT_LAST_SUCCESS.labels(source).set(time.time())

    # --- queues --------------------------------------------------------------------------

    def _js(self) -> JetStreamContext:
        nc = self._state.nc
        if nc is None or not nc.is_connected:
            raise ConnectionError("not connected to NATS")
        return nc.jetstream(timeout=2.0)

    async def _collect_queues(self) -> None:
        js = self._js()
        names = self._state.names
        times: dict[tuple[str, str, int], datetime | None] = {}
        self._lookups_left = MAX_LOOKUPS
        now = datetime.now(UTC)
        # First, so the lookup budget never leaves the control planes' own backlog unmeasured.
        results = next((c for c in await self._consumers(js, names.results_stream)
                        if c.name == names.results_consumer), None)  # fmt: skip
        results_state = QueueState()
        if results is not None:
            results_state = await self._queue_state(js, names.results_stream, names.results_filter, results, now, times)
        queues: dict[str, QueueState] = {}
        consumers = await self._consumers(js, names.steps_stream)
        accounted = 0
        for info in consumers:
            if not info.name.startswith("steps_"):
                continue
            queue = info.name[len("steps_") :]
            state = await self._queue_state(js, names.steps_stream, names.step_filter(queue), info, now, times)
            queues[queue] = state
            accounted += state.depth
        stream = await js.stream_info(names.steps_stream)
        # Messages no consumer accounts for: queues nobody has consumed yet. Under load the
        # counts race (messages come and go between the two reads), so while none was found
        # the listing is done every sixth round only.
        due = self._orphans_seen or time.monotonic() - self._listed_at >= 6 * self._interval_s
        if stream.state.messages > accounted and due:
            self._listed_at = time.monotonic()
            prefix = f"{names.prefix}.steps."
            listing = await js.stream_info(names.steps_stream, subjects_filter=f"{prefix}>")
            orphans: dict[str, int] = {}
            for subject, count in (listing.state.subjects or {}).items():
                queue = subject[len(prefix) :].split(".", 1)[0]
                if queue not in queues:
                    orphans[queue] = orphans.get(queue, 0) + int(count)
            for queue, count in sorted(orphans.items()):
                filter_subject = names.step_filter(queue)
                first = await self._first_time(js, names.steps_stream, filter_subject, 1, times)
                age = _age(now, first)
                queues[queue] = QueueState(depth=count, oldest_pending_s=age, oldest_unacked_s=age)
            self._orphans_seen = bool(orphans)
        elif stream.state.messages <= accounted:
            self._orphans_seen = False
        self._times = times

        labels = cap_labels(queues, MAX_QUEUES)
        merged: dict[str, QueueState] = {}
        for queue, state in queues.items():
            merged.setdefault(labels[queue], QueueState()).merge(state)
        fields = {QUEUE_DEPTH: "depth", QUEUE_ACK_PENDING: "ack_pending", QUEUE_REDELIVERED: "redelivered",
                  QUEUE_OLDEST_PENDING: "oldest_pending_s", QUEUE_OLDEST_UNACKED: "oldest_unacked_s"}  # fmt: skip
        for gauge, attr in fields.items():
            self._queues[gauge].replace({(q,): float(getattr(s, attr)) for q, s in merged.items()})
        RESULTS_DEPTH.set(results_state.depth)
        RESULTS_OLDEST_PENDING.set(results_state.oldest_pending_s)

    @staticmethod
    async def _consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
        out: list[ConsumerInfo] = []
        try:
            while True:
                page = await js.consumers_info(stream, offset=len(out) or None)
                out.extend(page)
                if len(page) < _CONSUMER_PAGE or len(out) >= 4 * MAX_QUEUES:
                    return out
        except NotFoundError:
            return out  # the stream is not created yet

    async def _queue_state(
        self,
        js: JetStreamContext,
        stream: str,
        filter_subject: str,
        info: ConsumerInfo,
        now: datetime,
        times: dict[tuple[str, str, int], datetime | None],
    ) -> QueueState:
        pending = int(info.num_pending or 0)
        ack_pending = int(info.num_ack_pending or 0)
        state = QueueState(depth=pending + ack_pending, ack_pending=ack_pending,
                           redelivered=int(info.num_redelivered or 0))  # fmt: skip
        if pending:
            delivered = info.delivered.stream_seq if info.delivered is not None else 0
            state.oldest_pending_s = _age(now, await self._first_time(js, stream, filter_subject, delivered + 1, times))
        if state.depth:
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            state.oldest_unacked_s = _age(now, await self._first_time(js, stream, filter_subject, floor + 1, times))
        return state

    async def _first_time(
        self,
        js: JetStreamContext,
        stream: str,
        filter_subject: str,
        seq: int,
        times: dict[tuple[str, str, int], datetime | None],
    ) -> datetime | None:
        """Publish time of the first message on ``filter_subject`` at or after ``seq``."""
        key = (stream, filter_subject, seq)
        if key in times:
            return times[key]
        if key in self._times and self._times[key] is not None:
            found = self._times[key]
        elif self._lookups_left <= 0:
            return None
        else:
            self._lookups_left -= 1
            try:
                msg = await js.get_msg(stream, seq=seq, subject=filter_subject, next=True)
                found = msg.time
            except NotFoundError:
                found = None  # acknowledged between the consumer info and this lookup
        times[key] = found
        return found

    # --- workers -------------------------------------------------------------------------

    async def _collect_workers(self) -> None:
        live = [w for w in await worker_registry.list_workers(self._state) if w.alive]
        names = cap_labels((w.id for w in live), MAX_WORKERS)
        queues = cap_labels((q for w in live for q in w.queues), MAX_QUEUES)
        inflight: dict[Labels, float] = {}
        capacity: dict[Labels, float] = {}
        per_queue: dict[Labels, float] = {}
        for w in live:
            for q in w.queues:
                key = (names[w.id], queues[q])
                inflight[key] = inflight.get(key, 0) + w.in_flight
                capacity[key] = capacity.get(key, 0) + w.concurrency
                per_queue[(queues[q],)] = per_queue.get((queues[q],), 0) + 1
        self._workers[WORKER_INFLIGHT].replace(inflight)
        self._workers[WORKER_CONCURRENCY].replace(capacity)
        self._workers[QUEUE_WORKERS].replace(per_queue)

    # --- Postgres ------------------------------------------------------------------------

    async def _collect_budgets(self) -> None:
        async with pg_autocommit(self._state.engine) as conn:
            rows = await conn.fetch(BUDGETS_SQL, MAX_BUDGETS)
            budgets = [(str(r["tenant_id"]), budget_from_row(r)) for r in rows]
            now = datetime.now(UTC)
            keys = [(t, b.name, window_key(b.period, _NO_RUN, now)) for t, b in budgets]
            windows = {}
            if keys:
                columns = [list(col) for col in zip(*keys, strict=True)]
                windows = {(r[0], r[1]): r for r in await conn.fetch(CURRENT_WINDOWS_SQL, *columns)}
        remaining_usd: dict[Labels, float] = {}
        remaining_tokens: dict[Labels, float] = {}
        limit_usd: dict[Labels, float] = {}
        limit_tokens: dict[Labels, float] = {}
        for tenant, budget in budgets:
            w = windows.get((tenant, budget.name))
            spent_usd, reserved_usd = (w["spent_usd"], w["reserved_usd"]) if w is not None else (0, 0)
            spent_tokens, reserved_tokens = (w["spent_tokens"], w["reserved_tokens"]) if w is not None else (0, 0)
            key = (tenant, budget.name)
            if budget.limit_usd is not None:
                limit_usd[key] = float(budget.limit_usd)
                remaining_usd[key] = float(budget.limit_usd - spent_usd - reserved_usd)
            if budget.limit_tokens is not None:
                limit_tokens[key] = float(budget.limit_tokens)
                remaining_tokens[key] = float(budget.limit_tokens - spent_tokens - reserved_tokens)
        self._budgets[BUDGET_REMAINING_USD].replace(remaining_usd)
        self._budgets[BUDGET_REMAINING_TOKENS].replace(remaining_tokens)
        self._budgets[BUDGET_LIMIT_USD].replace(limit_usd)
        self._budgets[BUDGET_LIMIT_TOKENS].replace(limit_tokens)

    async def _collect_audit(self) -> None:
        async with pg_autocommit(self._state.engine) as conn:
            heads = await conn.fetch("SELECT tenant_id, seq FROM audit_heads ORDER BY tenant_id LIMIT $1", MAX_TENANTS)
            # The queue is short-lived (sealed every 0.2 s); ordering by id uses its key.
            queued = await conn.fetchrow(
                "SELECT count(*), (SELECT ts FROM audit_queue ORDER BY id LIMIT 1) FROM audit_queue"
            )
        self._chains.replace({(str(t),): float(seq) for t, seq in heads})
        assert queued is not None
        AUDIT_UNSEALED.set(int(queued[0]))
        oldest: datetime | None = queued[1]
        AUDIT_UNSEALED_AGE.set(_age(datetime.now(UTC), oldest))


#: day and month windows do not depend on the run
_NO_RUN = uuid.UUID(int=0)

# Per-run budgets are left out: their windows (one per run) would be unbounded labels.
BUDGETS_SQL = (
    "SELECT tenant_id, name, scope, target, period, limit_usd, limit_tokens, enforcement FROM budgets"
    " WHERE period <> 'run' ORDER BY tenant_id, name LIMIT $1"
)
CURRENT_WINDOWS_SQL = (
    "SELECT tenant_id, budget, spent_usd, spent_tokens, reserved_usd, reserved_tokens FROM budget_windows"
    ' WHERE (tenant_id, budget, "window") IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))'
)


def _age(now: datetime, then: datetime | None) -> float:
    return 0.0 if then is None else max(0.0, (now - then).total_seconds())
