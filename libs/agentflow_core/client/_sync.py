"""The blocking client."""

from __future__ import annotations

import builtins
import logging
import os
import time
import uuid
from collections.abc import Generator, Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from agentflow_core import errors
from agentflow_core.client import _base as b
from agentflow_core.client import models

T = TypeVar("T")
log = logging.getLogger("agentflow.client")

RunId = str | uuid.UUID
Spec = Mapping[str, Any] | str | bytes | os.PathLike[str]


class AgentFlowClient:
    """A client of the AgentFlow REST API.

    ``base_url`` defaults to ``AGENTFLOW_URL`` (or ``AGENTFLOW_API_URL``, or the local
    stack at http://127.0.0.1:8080) and ``token`` to ``AGENTFLOW_TOKEN``. ``timeout``
    applies to each attempt of each request (``None``: no timeout) unless a call passes
    its own. Requests that are safe to repeat are retried ``max_retries`` times after
    connection errors and 429/503 (waiting as ``Retry-After`` says). Pass ``transport``
    (e.g. ``httpx.HTTPTransport(verify=...)``) or a whole ``http_client`` to control
    TLS, proxies and connection pooling.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = b.DEFAULT_TIMEOUT,
        max_retries: int = b.DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        stream_idle_timeout: float = b.DEFAULT_STREAM_IDLE_TIMEOUT,
        max_stream_reconnects: int = b.DEFAULT_STREAM_RECONNECTS,
        retry_policy: b.RetryPolicy | None = None,
    ) -> None:
        self.base_url = b.base_url_from(base_url)
        token = b.token_from(token)
        self._headers: dict[str, str] = {"User-Agent": b.USER_AGENT, **(headers or {})}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, transport=transport)
        self._retry = retry_policy or b.RetryPolicy(max_retries=max_retries)
        self._stream_idle = stream_idle_timeout
        self._max_reconnects = max_stream_reconnects
        self.workflows = Workflows(self)
        self.runs = Runs(self)
        self.events = Events(self)
        self.costs = Costs(self)
        self.budgets = Budgets(self)
        self.audit = Audit(self)
        self.workers = Workers(self)

    def __enter__(self) -> AgentFlowClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def ready(self, *, timeout: b.Timeout = b.NOT_GIVEN) -> models.Ready:
        """Whether the control plane reaches Postgres and NATS (``GET /readyz``); never raises for 503."""
        return self._request(b.ready(), timeout)

    # --- plumbing ---------------------------------------------------------------------------

    def _timeout(self, timeout: b.Timeout, deadline: float | None) -> Any:
        if deadline is None:
            return b.httpx_timeout(timeout)
        if isinstance(timeout, b.NotGiven):
            timeout = self._http.timeout
        return b.capped(httpx.Timeout(timeout), deadline - time.monotonic())

    def _send(self, call: b.Call[Any], timeout: b.Timeout, deadline: float | None = None) -> httpx.Response:
        url = self.base_url + call.path
        headers = {**self._headers, **call.headers}
        attempt = 0
        while True:
            error: errors.AgentFlowError
            try:
                response = self._http.request(
                    call.method, url, params=call.params, json=call.json, content=call.content, headers=headers,
                    timeout=self._timeout(timeout, deadline),
                )  # fmt: skip
            except httpx.HTTPError as exc:
                delay = self._retry.after_exception(call, exc, attempt)
                error = b.transport_error(exc, call.method, url)
                error.__cause__ = exc
            else:
                if response.is_success or response.status_code in call.accept:
                    return response
                delay = self._retry.after_response(call, response, attempt)
                error = b.error_from_response(response)
            if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
                raise error
            log.info("retrying %s %s in %.2fs (attempt %d): %s", call.method, call.path, delay, attempt + 1, error)
            time.sleep(delay)
            attempt += 1

    def _request(self, call: b.Call[T], timeout: b.Timeout, deadline: float | None = None) -> T:
        return call.parse(self._send(call, timeout, deadline))

    def _stream(
        self,
        path: str,
        params: dict[str, Any],
        after: int | None,
        *,
        timeout: b.Timeout,
        run_id: RunId | None = None,
        deadline: float | None = None,
        run_known: bool = False,
    ) -> Generator[models.Event, None, None]:
        """Events from an SSE endpoint, reconnecting with ``after=<last cursor>`` whenever the
        connection drops; a run's stream ends after its terminal event."""
        url = self.base_url + path
        headers = {**self._headers, "Accept": "text/event-stream"}
        per_read = b.stream_timeout(self._http.timeout, timeout, self._stream_idle)
        last = after
        failures = 0
        while True:
            query = dict(params)
            if last is not None:
                query["after"] = last
            read_timeout = per_read if deadline is None else b.capped(per_read, deadline - time.monotonic())
            retry_after: float | None = None
            received = clean_end = False
            error: errors.AgentFlowError
            try:
                with self._http.stream("GET", url, params=query, headers=headers, timeout=read_timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                    if response.status_code in b.RETRY_STATUSES:
                        error = b.error_from_response(response)
                        retry_after = error.retry_after if isinstance(error, errors.APIError) else None
                    else:
                        b.check_stream_response(response, run_known=run_known)
                        decoder = b.SSEDecoder()
                        for line in response.iter_lines():
                            if deadline is not None and time.monotonic() >= deadline:
                                raise errors.WaitTimeout("deadline passed while streaming events")
                            message = decoder.feed(line)
                            if message is None:
                                continue
                            failure = b.error_event(message)
                            if isinstance(failure, errors.APIError):
                                raise failure
                            if failure is not None:  # slow consumer, server going away: resume
                                error = failure
                                break
                            event = b.event_from(message)
                            # The server resumes strictly after the cursor sent; this guards
                            # against a proxy replaying a buffered tail.
                            if event is None or (last is not None and event.cursor <= last):
                                continue
                            last, failures, received = event.cursor, 0, True
                            yield event
                            if run_id is not None and event.terminal:
                                return
                        else:
                            error = errors.TransportError(f"GET {url}: the server closed the event stream")
                            clean_end = True
            except httpx.HTTPError as exc:
                error = b.transport_error(exc, "GET", url)
                error.__cause__ = exc
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.WaitTimeout("deadline passed while streaming events")
            if run_id is not None and clean_end and not received and self._run_finished(run_id, deadline):
                # A finished run's stream closes at once when nothing follows ``after``.
                return
            failures += 1
            if failures > self._max_reconnects:
                raise error
            delay = retry_after if retry_after is not None else self._retry.backoff_delay(failures - 1)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise errors.WaitTimeout("deadline passed while reconnecting to the event stream")
            log.info("event stream %s dropped (%s); resuming after cursor %s in %.2fs", path, error, last, delay)
            time.sleep(delay)

    def _run_finished(self, run_id: RunId, deadline: float | None) -> bool:
        try:
            return self._request(b.get_run(run_id), b.NOT_GIVEN, deadline).finished
        except errors.TransportError:
            return False


class _Resource:
    def __init__(self, client: AgentFlowClient) -> None:
        self._c = client


class Workflows(_Resource):
    def put(self, spec: Spec, *, name: str | None = None, timeout: b.Timeout = b.NOT_GIVEN) -> models.WorkflowVersion:
        """Register a workflow: a mapping (sent as JSON), YAML text, or a path to a YAML/JSON
        file. A changed spec becomes a new version; the same spec again creates nothing."""
        body: Mapping[str, Any] | str | bytes = Path(spec).read_bytes() if isinstance(spec, os.PathLike) else spec
        return self._c._request(b.put_workflow(name or b.workflow_name(body), body), timeout)

    def get(self, name: str, *, version: int | None = None, timeout: b.Timeout = b.NOT_GIVEN) -> models.Workflow:
        """The latest (or the given) version of a workflow, with its spec and every version number."""
        return self._c._request(b.get_workflow(name, version), timeout)


class Runs(_Resource):
    def create(
        self,
        workflow: str,
        input: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> models.CreatedRun:
        """Start a run. With ``idempotency_key`` a repeat returns the first run (``created``
        False) and the request is retried after transient failures; without one it is
        retried only when the connection could not be made."""
        return self._c._request(b.create_run(workflow, input, version, idempotency_key), timeout)

    def estimate(
        self, workflow: str, input: Any = None, *, version: int | None = None, timeout: b.Timeout = b.NOT_GIVEN
    ) -> models.DryRun:
        """What a run would cost (``dry_run``); nothing starts."""
        return self._c._request(b.estimate_run(workflow, input, version), timeout)

    def get(self, run_id: RunId, *, timeout: b.Timeout = b.NOT_GIVEN) -> models.Run:
        return self._c._request(b.get_run(run_id), timeout)

    def list(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int | None = None,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> builtins.list[models.RunSummary]:
        """Recent runs, newest first (``limit`` up to 500, default 50)."""
        return self._c._request(b.list_runs(status, workflow, limit), timeout)

    def cancel(self, run_id: RunId, *, timeout: b.Timeout = b.NOT_GIVEN) -> models.Run:
        """Cancel a run that is still going (a finished run is returned unchanged)."""
        return self._c._request(b.cancel_run(run_id), timeout)

    def tool_calls(self, run_id: RunId, *, timeout: b.Timeout = b.NOT_GIVEN) -> builtins.list[models.ToolCall]:
        return self._c._request(b.tool_calls(run_id), timeout)

    def envelopes(self, run_id: RunId, *, timeout: b.Timeout = b.NOT_GIVEN) -> builtins.list[models.Envelope]:
        return self._c._request(b.envelopes(run_id), timeout)

    def events(
        self, run_id: RunId, *, after: int | None = None, timeout: b.Timeout = b.NOT_GIVEN
    ) -> Generator[models.Event, None, None]:
        """The run's events from the start (or after cursor ``after``), live until the run
        finishes: the iterator ends after run.succeeded/failed/cancelled. Reconnects after
        any disconnect, resuming after the last cursor received (no gap, no duplicate).
        ``timeout`` bounds the silence between bytes (keepalives arrive every 15 s)."""
        return self._c._stream(f"/v1/runs/{b.id_str(run_id)}/events", {}, after, timeout=timeout, run_id=run_id)

    def wait(self, run_id: RunId, timeout: float | None = None, *, poll_interval: float = 2.0) -> models.Run:
        """Block until the run finishes and return it (whatever its status: check
        ``run.status`` or ``run.succeeded``). ``timeout`` is the total wait in seconds
        (``None``: as long as it takes); then :class:`WaitTimeout`. Follows the event stream,
        or polls every ``poll_interval`` seconds where the server offers none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = "unknown"
        try:
            run = self._c._request(b.get_run(run_id), b.NOT_GIVEN, deadline)
            status = run.status
            if run.finished:
                return run
            try:
                for event in self._c._stream(
                    f"/v1/runs/{b.id_str(run_id)}/events", {}, None, timeout=b.NOT_GIVEN, run_id=run_id,
                    deadline=deadline, run_known=True,
                ):  # fmt: skip
                    if event.type == "run.started":
                        status = "running"
            except b.StreamUnsupported as exc:
                log.info("no event stream for run %s (%s): polling", run_id, exc)
            interval = min(0.2, poll_interval)
            while True:
                run = self._c._request(b.get_run(run_id), b.NOT_GIVEN, deadline)
                status = run.status
                if run.finished:
                    return run
                pause = interval if deadline is None else min(interval, deadline - time.monotonic())
                if pause <= 0:
                    raise errors.WaitTimeout("deadline passed")
                time.sleep(pause)
                interval = min(interval * 2, poll_interval)
        except (errors.WaitTimeout, errors.TransportError) as exc:
            if isinstance(exc, errors.TransportError) and (deadline is None or time.monotonic() < deadline):
                raise
            raise errors.WaitTimeout(f"run {run_id} still {status} after {timeout}s") from exc


class Events(_Resource):
    def __call__(
        self,
        *,
        after: int | None = None,
        run_id: RunId | None = None,
        workflow: str | None = None,
        type: str | None = None,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> Generator[models.Event, None, None]:
        """The tenant's event stream, filtered by run, workflow or type prefix (``"run."``).
        Never ends by itself. Without ``after`` it starts with live events (``after=0``
        replays everything retained); reconnects resume after the last cursor received."""
        params = b.clean_params({"run_id": run_id, "workflow": workflow, "type": type})
        return self._c._stream("/v1/events", params, after, timeout=timeout)

    def list(
        self,
        *,
        after: int | None = None,
        run_id: RunId | None = None,
        workflow: str | None = None,
        type: str | None = None,
        limit: int | None = None,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> models.EventPage:
        """One page of stored events (history only, no waiting); pass ``next_cursor`` as ``after``."""
        return self._c._request(b.event_page(after, run_id, workflow, type, limit), timeout)

    def ticket(self, *, timeout: b.Timeout = b.NOT_GIVEN) -> models.EventTicket:
        """A 60-second ``?ticket=`` for a client that cannot send an Authorization header (a browser)."""
        return self._c._request(b.event_ticket(), timeout)


class Costs(_Resource):
    def get(
        self,
        *,
        period: str | None = None,
        group_by: str | None = None,
        workflow: str | None = None,
        run: RunId | None = None,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> models.Costs:
        """Spend from the cost ledger: ``period`` today | 7d | month, ``group_by``
        workflow | agent | model | day | run."""
        return self._c._request(b.get_costs(period, group_by, workflow, run), timeout)

    def calibration(self, *, last: int | None = None, timeout: b.Timeout = b.NOT_GIVEN) -> models.Calibration:
        """Learnt correction factors per (agent, model) and the errors of their last ``last`` estimates."""
        return self._c._request(b.calibration(last), timeout)


class Budgets(_Resource):
    def list(self, *, timeout: b.Timeout = b.NOT_GIVEN) -> builtins.list[models.Budget]:
        return self._c._request(b.list_budgets(), timeout)

    def get(self, name: str, *, timeout: b.Timeout = b.NOT_GIVEN) -> models.Budget:
        return self._c._request(b.get_budget(name), timeout)

    def put(
        self,
        name: str,
        *,
        scope: str,
        period: str,
        target: str | None = None,
        limit_usd: Decimal | float | str | None = None,
        limit_tokens: int | None = None,
        enforcement: str | None = None,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> models.Budget:
        """Create or replace a budget (``scope`` tenant | workflow | agent | run, ``period``
        run | day | month, ``enforcement`` hard (default) | soft)."""
        call = b.put_budget(name, scope, period, target, limit_usd, limit_tokens, enforcement)
        return self._c._request(call, timeout)

    def delete(self, name: str, *, timeout: b.Timeout = b.NOT_GIVEN) -> None:
        self._c._request(b.delete_budget(name), timeout)


class Audit(_Resource):
    def verify(self, *, timeout: b.Timeout = b.NOT_GIVEN) -> models.AuditVerification:
        """Recompute the tenant's whole hash chain and compare it with its last external anchor."""
        return self._c._request(b.audit_verify(), timeout)

    def list(
        self,
        *,
        run: RunId | None = None,
        action: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: int | None = None,
        limit: int | None = None,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> models.AuditPage:
        """One page of audit entries in chain order; ``action`` exact (run.created) or a family (step.*)."""
        return self._c._request(b.audit_list(run, action, actor, since, until, after, limit), timeout)

    def iter(
        self,
        *,
        run: RunId | None = None,
        action: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 500,
        timeout: b.Timeout = b.NOT_GIVEN,
    ) -> Generator[models.AuditEntry, None, None]:
        """Every matching entry, fetching pages as needed."""
        after: int | None = None
        while True:
            page = self.list(run=run, action=action, actor=actor, since=since, until=until, after=after,
                             limit=page_size, timeout=timeout)  # fmt: skip
            yield from page.entries
            if page.next_after is None:
                return
            after = page.next_after


class Workers(_Resource):
    def list(self, *, timeout: b.Timeout = b.NOT_GIVEN) -> builtins.list[models.Worker]:
        """Workers that sent a heartbeat recently, with their queues and load."""
        return self._c._request(b.list_workers(), timeout)
