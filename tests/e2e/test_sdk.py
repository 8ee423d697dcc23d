"""The Python SDK (agentflow_core.client) against the real control plane, workers,
Postgres and NATS of the shared cluster. Retry and timeout behaviour, which needs a
server that misbehaves on cue, runs against small scripted HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from agentflow_control_plane.auth import issue_token
from agentflow_core import errors
from agentflow_core.client import (
    NOT_GIVEN,
    AgentFlowClient,
    AsyncAgentFlowClient,
    Event,
    RetryPolicy,
    parse_retry_after,
)
from tests.e2e.test_reliability import Proxy
from tests.support.processes import Api, Cluster, chain_workflow, free_port
from tests.support.services import TestEnv

pytestmark = pytest.mark.e2e
T = TypeVar("T")

TERMINAL = {"run.succeeded", "run.failed", "run.cancelled"}


def _token(env: TestEnv, tenant: str, roles: tuple[str, ...] = ("admin",)) -> str:
    return issue_token(env.secret, tenant=tenant, roles=list(roles), subject="sdk-test", ttl_s=3600)


@pytest.fixture
def sdk(api: Api, shared_env: TestEnv) -> Iterator[AgentFlowClient]:
    with AgentFlowClient(api.url, token=_token(shared_env, api.tenant)) as client:
        yield client


def _sleepy(name: str, steps: int = 2, ms: int = 300) -> dict[str, Any]:
    return chain_workflow(name, steps, {"type": "sleep", "ms": ms, "timeout_s": 30})


# --- packaging ------------------------------------------------------------------------------

BLOCKED = ["fastapi", "starlette", "sqlalchemy", "asyncpg", "nats", "uvicorn", "litellm", "alembic", "jwt",
           "prometheus_client", "agentflow_control_plane", "agentflow_worker", "agentflow_bus",
           "agentflow_cli"]  # fmt: skip

IMPORT_SCRIPT = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of server dependency {name}")
        return None

sys.meta_path.insert(0, Block())
import asyncio
import agentflow_core
from agentflow_core import AgentFlowClient as Top
from agentflow_core.client import AgentFlowClient, AsyncAgentFlowClient, NotFound, Run
assert Top is AgentFlowClient
with AgentFlowClient("http://127.0.0.1:9", token="t") as c:
    assert c.runs and c.workflows and c.budgets and c.audit and c.costs and c.workers
async def main():
    async with AsyncAgentFlowClient("http://127.0.0.1:9") as c:
        assert c.runs
asyncio.run(main())
print("loaded", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_the_sdk_imports_and_constructs_without_any_server_dependency() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT, ",".join(BLOCKED)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded []"


def test_importing_agentflow_core_does_not_load_the_sdk() -> None:
    script = "import sys, agentflow_core.spec; print('httpx' in sys.modules, 'agentflow_core.client' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False False", done.stderr


# --- against the real control plane -----------------------------------------------------------


def test_workflows_runs_idempotency_and_wait(sdk: AgentFlowClient, cluster: tuple[Cluster, str]) -> None:
    first = sdk.workflows.put(chain_workflow("greet", 2))
    assert (first.name, first.version, first.created) == ("greet", 1, True)
    assert sdk.workflows.put(chain_workflow("greet", 2)).created is False
    yaml_spec = """
name: greet
agents: {a: {type: echo}}
planner:
  type: fsm
  initial_state: s0
  states: {s0: {agent: a, on_success: done, on_error: failed}}
  final_states: [done, failed]
"""
    second = sdk.workflows.put(yaml_spec)
    assert (second.version, second.created) == (2, True)
    latest = sdk.workflows.get("greet")
    assert latest.version == 2 and latest.versions == [1, 2] and latest.spec["planner"]["initial_state"] == "s0"
    assert sdk.workflows.get("greet", version=1).spec_hash == first.spec_hash

    key = f"order-{secrets.token_hex(4)}"
    created = sdk.runs.create("greet", {"message": "hi"}, version=1, idempotency_key=key)
    again = sdk.runs.create("greet", {"message": "hi"}, version=1, idempotency_key=key)
    assert created.created is True and again.created is False and again.id == created.id
    assert [r.id for r in sdk.runs.list(workflow="greet")] == [created.id]  # the repeat started nothing

    run = sdk.runs.wait(created.id, timeout=30)
    assert run.status == "succeeded" and run.succeeded and run.finished, cluster[0].logs()
    assert run.output == {"message": "hi"} and len(run.steps) == 2
    assert all(s.status == "succeeded" and s.worker in ("shared-1", "shared-2") for s in run.steps)
    assert run.usage is not None and run.usage.cost_usd == 0
    assert sdk.runs.get(str(created.id)).finished_at == run.finished_at
    kinds = [e.kind for e in sdk.runs.envelopes(created.id)]
    assert sorted(kinds) == ["result", "result", "step", "step"]
    assert sdk.runs.tool_calls(created.id) == []
    # Waiting on a finished run returns it at once.
    started = time.monotonic()
    assert sdk.runs.wait(created.id, timeout=5).id == created.id and time.monotonic() - started < 2


def test_governance_workers_and_estimates(sdk: AgentFlowClient) -> None:
    sdk.workflows.put(chain_workflow("gov", 1))
    run = sdk.runs.wait(sdk.runs.create("gov", 1).id, timeout=30)
    assert run.succeeded
    workers = {w.id: w for w in sdk.workers.list()}
    assert {"shared-1", "shared-2"} <= set(workers) and workers["shared-1"].alive
    dry = sdk.runs.estimate("gov", {"x": 1})
    assert dry.dry_run and dry.version == 1 and dry.estimate.expected_steps == 1
    assert dry.estimate.expected_cost_usd == 0

    budget = sdk.budgets.put("daily", scope="tenant", period="day", limit_usd="12.5", limit_tokens=1000)
    assert str(budget.limit_usd) == "12.50" and budget.current is not None and budget.enforcement == "hard"
    assert [b.name for b in sdk.budgets.list()] == ["daily"]
    assert sdk.budgets.get("daily").limit_tokens == 1000
    sdk.budgets.delete("daily")
    with pytest.raises(errors.NotFound):
        sdk.budgets.get("daily")

    costs = sdk.costs.get(period="today", group_by="workflow")
    assert costs.period == "today" and costs.from_ <= costs.to and costs.total.llm_calls == 0
    calibration = sdk.costs.calibration(last=10)
    assert calibration.last == 10 and calibration.groups == []

    deadline = time.monotonic() + 15
    while (verified := sdk.audit.verify()).pending:  # entries are sealed within ~0.2 s
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert verified.ok and verified.length >= 4 and verified.first_bad_seq is None
    created = sdk.audit.list(action="run.created")
    assert [e.data["run"] for e in created.entries] == [str(run.id)]
    every = list(sdk.audit.iter(page_size=2))
    assert [e.seq for e in every] == list(range(1, verified.length + 1))


def test_errors_map_to_the_most_specific_class(api: Api, sdk: AgentFlowClient, shared_env: TestEnv) -> None:
    missing = uuid.uuid4()
    with pytest.raises(errors.NotFound) as not_found:
        sdk.runs.get(missing)
    e = not_found.value
    assert isinstance(e, errors.APIError) and isinstance(e, errors.AgentFlowError)
    assert (e.status, e.code) == (404, "not_found") and str(missing) in e.detail
    assert e.response_body == {"code": "not_found", "detail": e.detail}
    with pytest.raises(errors.NotFound):
        sdk.workflows.get("nope")

    with pytest.raises(errors.ValidationFailed) as invalid:
        sdk.runs.create("", {})
    assert invalid.value.status == 422 and invalid.value.code == "validation_failed"
    assert [err["loc"] for err in invalid.value.errors] == ["body.workflow"]
    assert "body.workflow" in str(invalid.value)
    with pytest.raises(errors.ValidationFailed) as bad_budget:
        sdk.budgets.put("b", scope="tenant", period="week", limit_usd=1)
    assert "period" in json.dumps(bad_budget.value.errors)
    with pytest.raises(errors.ValidationFailed) as bad_spec:
        sdk.workflows.put({"name": "broken", "agents": {}, "planner": {"type": "fsm"}})
    assert bad_spec.value.errors

    sdk.workflows.put(chain_workflow("echo", 1))
    with pytest.raises(errors.CanonicalizationError) as huge:
        sdk.runs.create("echo", {"n": 2**60})
    assert huge.value.code == "not_canonicalizable" and isinstance(huge.value, errors.ValidationFailed)

    key = f"k-{secrets.token_hex(4)}"
    sdk.runs.create("echo", {"n": 1}, idempotency_key=key)
    with pytest.raises(errors.Conflict) as conflict:
        sdk.runs.create("echo", {"n": 2}, idempotency_key=key)
    assert conflict.value.status == 409 and key in conflict.value.detail

    with AgentFlowClient(api.url, token="not-a-jwt") as bad, pytest.raises(errors.Unauthorized) as unauthorized:
        bad.runs.list()
    assert unauthorized.value.status == 401 and unauthorized.value.headers.get("www-authenticate") == "Bearer"
    with AgentFlowClient(api.url, token=_token(shared_env, api.tenant, ("viewer",))) as viewer:
        assert viewer.runs.list() != []
        with pytest.raises(errors.Forbidden):
            viewer.runs.create("echo", {})


def test_a_hard_budget_refusal_is_budget_exceeded_with_its_numbers(sdk: AgentFlowClient) -> None:
    model = {"provider": "openai", "model": "house-model", "api_base": "http://127.0.0.1:9/v1", "max_tokens": 100}
    llm = {"type": "llm", "prompt": "Say hi.", "model": model}
    sdk.workflows.put({**chain_workflow("pricey", 1), "agents": {"a": llm}})
    assert sdk.runs.estimate("pricey").estimate.expected_tokens > 10
    sdk.budgets.put("cap", scope="workflow", target="pricey", period="run", limit_tokens=10)
    with pytest.raises(errors.BudgetExceeded) as refused:
        sdk.runs.create("pricey", {})
    e = refused.value
    assert (e.status, e.code) == (402, "budget_exceeded") and "budget 'cap'" in e.detail
    assert e.errors["budget"] == "cap" and e.errors["limit_tokens"] == 10
    assert sdk.runs.list(workflow="pricey") == []


def test_wait_timeout_is_a_clear_error_and_the_run_goes_on(sdk: AgentFlowClient) -> None:
    sdk.workflows.put(_sleepy("slow", steps=1, ms=4000))
    run_id = sdk.runs.create("slow", {}).id
    started = time.monotonic()
    with pytest.raises(errors.WaitTimeout) as timed_out:
        sdk.runs.wait(run_id, timeout=0.7)
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 3, elapsed
    assert isinstance(timed_out.value, TimeoutError) and str(run_id) in str(timed_out.value)
    assert not sdk.runs.get(run_id).finished
    cancelled = sdk.runs.cancel(run_id)
    assert cancelled.status == "cancelled"
    assert sdk.runs.cancel(run_id).status == "cancelled"  # repeating a cancel is harmless
    assert sdk.runs.wait(run_id, timeout=5).status == "cancelled"


class _NoEventStream(httpx.BaseTransport):
    """The real server, except that its event endpoints answer 404 (a control plane
    without event streams, or a proxy that does not pass them)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.polls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"code": "not_found", "detail": "Not Found"}, request=request)
        if request.method == "GET" and request.url.path.startswith("/v1/runs/"):
            self.polls += 1
        return self.inner.handle_request(request)


def test_wait_falls_back_to_polling_without_an_event_stream(api: Api, shared_env: TestEnv) -> None:
    transport = _NoEventStream()
    with AgentFlowClient(api.url, token=_token(shared_env, api.tenant), transport=transport) as client:
        client.workflows.put(_sleepy("polled", steps=2, ms=200))
        run = client.runs.wait(client.runs.create("polled", {}).id, timeout=30, poll_interval=0.2)
    assert run.succeeded
    assert transport.polls >= 3


async def test_async_client_end_to_end(api: Api, shared_env: TestEnv) -> None:
    async with AsyncAgentFlowClient(api.url, token=_token(shared_env, api.tenant)) as client:
        version = await client.workflows.put(chain_workflow("async-greet", 2))
        assert version.created
        key = f"a-{secrets.token_hex(4)}"
        first, second = await asyncio.gather(
            client.runs.create("async-greet", {"v": 1}, idempotency_key=key),
            client.runs.create("async-greet", {"v": 1}, idempotency_key=key),
        )
        assert first.id == second.id and {first.created, second.created} == {True, False}
        run = await client.runs.wait(first.id, timeout=30)
        assert run.succeeded and run.output == {"v": 1}
        with pytest.raises(errors.NotFound):
            await client.runs.get(uuid.uuid4())
        assert [r.id for r in await client.runs.list()] == [first.id]
        deadline = time.monotonic() + 15
        while (await client.audit.verify()).pending:  # entries are sealed within ~0.2 s
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        entries = [e async for e in client.audit.iter(action="run.created")]
        assert [e.data["run"] for e in entries] == [str(first.id)]
        await client.workflows.put(_sleepy("async-slow", steps=1, ms=3000))
        slow = await client.runs.create("async-slow", {})
        with pytest.raises(errors.WaitTimeout):
            await client.runs.wait(slow.id, timeout=0.5)
        await client.runs.cancel(slow.id)


# --- events (GET /v1/runs/{id}/events, GET /v1/events) ----------------------------------------


def _within(seconds: float, work: Callable[[], T]) -> T:
    """``work()``'s result, failing (instead of hanging the suite) when it takes longer."""
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if failed:
        raise failed[0]
    assert done, f"still going after {seconds}s"
    return done[0]


def _full_history(client: AgentFlowClient, run_id: uuid.UUID) -> list[Event]:
    return list(client.runs.events(run_id))


def test_run_events_stream_live_to_the_terminal_event_and_resume_from_a_cursor(sdk: AgentFlowClient) -> None:
    sdk.workflows.put(_sleepy("watched", steps=3, ms=200))
    run_id = sdk.runs.create("watched", {"k": 1}).id
    events = list(sdk.runs.events(run_id))  # live: the run is still going when this starts
    types = [e.type for e in events]
    assert types[0] == "run.created" and types[-1] == "run.succeeded", types
    assert types.count("step.succeeded") == 3
    cursors = [e.cursor for e in events]
    assert cursors == sorted(set(cursors))  # increasing, no duplicate
    assert all(e.run_id == run_id and e.workflow == "watched" for e in events)
    succeeded = [e for e in events if e.type == "step.succeeded"]
    assert all(e.step_id is not None and e.data["name"] for e in succeeded)

    # Resuming after any cursor gives exactly the rest: no gap, no duplicate.
    for i in (0, len(events) // 2, len(events) - 2):
        rest = list(sdk.runs.events(run_id, after=events[i].cursor))
        assert [e.cursor for e in rest] == cursors[i + 1 :]
    # After the terminal event there is nothing more, and the iterator ends (at once, not at the
    # first keepalive).
    assert _within(5, lambda: list(sdk.runs.events(run_id, after=cursors[-1]))) == []
    assert sdk.runs.get(run_id).succeeded


def test_run_events_resume_by_themselves_after_the_connection_drops(api: Api, shared_env: TestEnv) -> None:
    host, port = urlsplit(api.url).hostname or "127.0.0.1", urlsplit(api.url).port or 80
    proxy = Proxy((host, port))
    assert not isinstance(proxy.listen, str)
    token = _token(shared_env, api.tenant)
    try:
        with (
            AgentFlowClient(f"http://127.0.0.1:{proxy.listen[1]}", token=token) as through_proxy,
            AgentFlowClient(api.url, token=token) as direct,
        ):
            direct.workflows.put(_sleepy("dropped", steps=4, ms=300))
            run_id = direct.runs.create("dropped", {}).id
            seen: list[Event] = []
            cuts = 0
            for event in through_proxy.runs.events(run_id):
                seen.append(event)
                if event.type == "step.succeeded" and cuts < 2:
                    proxy.down()  # every open connection is cut mid-stream
                    proxy.up()
                    cuts += 1
            assert cuts == 2
            everything = _full_history(direct, run_id)
            assert [e.cursor for e in seen] == [e.cursor for e in everything]
            assert seen[-1].type == "run.succeeded"
    finally:
        proxy.close()


def test_tenant_event_stream_filters_and_replays(sdk: AgentFlowClient) -> None:
    sdk.workflows.put(chain_workflow("tenant-a", 1))
    sdk.workflows.put(chain_workflow("tenant-b", 1))
    a = sdk.runs.wait(sdk.runs.create("tenant-a", {}).id, timeout=30)
    b = sdk.runs.wait(sdk.runs.create("tenant-b", {}).id, timeout=30)
    assert a.succeeded and b.succeeded
    page = sdk.events.list(after=0, type="run.")
    assert {e.type for e in page.events} <= {"run.created", "run.started", "run.succeeded"}
    assert {e.run_id for e in page.events} == {a.id, b.id} and page.next_cursor >= page.events[-1].cursor
    only_b = sdk.events.list(after=0, workflow="tenant-b")
    assert only_b.events and {e.run_id for e in only_b.events} == {b.id}

    # The tenant stream never ends: take what is replayed, then a live event.
    stream = sdk.events(after=0, type="run.succeeded")
    replayed = [next(stream), next(stream)]
    assert {e.run_id for e in replayed} == {a.id, b.id}
    c = sdk.runs.create("tenant-a", {}).id
    live = next(stream)
    assert (live.type, live.run_id) == ("run.succeeded", c) and live.cursor > replayed[-1].cursor
    stream.close()  # ends the connection


async def test_async_run_events_with_resume(api: Api, shared_env: TestEnv) -> None:
    async with AsyncAgentFlowClient(api.url, token=_token(shared_env, api.tenant)) as client:
        await client.workflows.put(_sleepy("async-watched", steps=2, ms=200))
        run_id = (await client.runs.create("async-watched", {})).id
        events = [e async for e in client.runs.events(run_id)]
        assert events[-1].type == "run.succeeded"
        rest = [e async for e in client.runs.events(run_id, after=events[1].cursor)]
        assert [e.cursor for e in rest] == [e.cursor for e in events[2:]]
        with pytest.raises(errors.NotFound):
            async for _ in client.runs.events(uuid.uuid4()):
                pass


def test_another_tenants_run_events_are_refused(sdk: AgentFlowClient, api: Api, shared_env: TestEnv) -> None:
    sdk.workflows.put(chain_workflow("private", 1))
    run_id = sdk.runs.create("private", {}).id
    other_tenant = _token(shared_env, api.tenant + "-other")
    with AgentFlowClient(api.url, token=other_tenant) as other, pytest.raises(errors.NotFound):
        list(other.runs.events(run_id))
    with AgentFlowClient(api.url, token="forged") as anonymous, pytest.raises(errors.Unauthorized):
        list(anonymous.runs.events(run_id))


# --- retries, timeouts and transport errors against scripted local servers -------------------

RUN_BODY = {
    "id": str(uuid.uuid4()), "workflow": "w", "version": 1, "status": "running", "error": None,
    "created_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None, "steps": [],
    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": "0"},
}  # fmt: skip


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: RUN_BODY)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: close the connection without answering
    drop: bool = False
    #: raw text/event-stream lines, sent and flushed one by one, then the connection closes
    sse: list[str] | None = None


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    at: float


class Scripted:
    """A real HTTP server on 127.0.0.1 answering each request with the next scripted reply."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.seen: list[Seen] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                script.seen.append(Seen(self.command, parts.path, parse_qs(parts.query),
                                        {k.lower(): v for k, v in self.headers.items()}, time.monotonic()))  # fmt: skip
                reply = script.replies.pop(0) if script.replies else Reply(500, {"code": "internal", "detail": "?"})
                time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    return
                if reply.sse is not None:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for line in reply.sse:
                        self.wfile.write(line.encode() + b"\n")
                        self.wfile.flush()
                    self.close_connection = True
                    return
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


FAST = RetryPolicy(max_retries=3, backoff=0.05, max_backoff=0.2)


def test_retry_after_in_seconds_and_as_an_http_date_is_honoured() -> None:
    # An HTTP date has one-second resolution and the 429 comes ~1 s after this line: aim 4 s ahead.
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)
    replies = [Reply(503, {"code": "unavailable", "detail": "starting"}, {"Retry-After": "1"}),
               Reply(429, {"code": "rate_limited", "detail": "slow down"}, {"Retry-After": soon}),
               Reply()]  # fmt: skip
    with Scripted(replies) as server, AgentFlowClient(server.url, token="t", retry_policy=FAST) as client:
        run = client.runs.get("r1")
    assert run.status == "running" and len(server.seen) == 3
    first, second, third = (s.at for s in server.seen)
    assert second - first >= 0.95  # Retry-After: 1
    assert third - second >= 1.5
    assert server.seen[0].headers["authorization"] == "Bearer t"


def test_retries_stop_at_max_retries_and_raise_the_mapped_error() -> None:
    replies = [Reply(503, {"code": "unavailable", "detail": "down"}) for _ in range(5)]
    with (
        Scripted(replies) as server,
        AgentFlowClient(server.url, retry_policy=FAST) as client,
        pytest.raises(errors.Unavailable) as down,
    ):
        client.runs.list()
    assert len(server.seen) == 4 and down.value.status == 503 and down.value.detail == "down"
    with Scripted([Reply(503, {"code": "unavailable", "detail": "down"})] * 2) as server:
        with AgentFlowClient(server.url, max_retries=0) as client, pytest.raises(errors.Unavailable):
            client.runs.list()
        assert len(server.seen) == 1


def test_a_retry_after_beyond_the_limit_is_raised_at_once_with_its_value() -> None:
    replies = [Reply(429, {"code": "rate_limited", "detail": "later"}, {"Retry-After": "3600"}), Reply()]
    with (
        Scripted(replies) as server,
        AgentFlowClient(server.url, retry_policy=FAST) as client,
        pytest.raises(errors.RateLimited) as limited,
    ):
        client.runs.get("r1")
    assert limited.value.retry_after == 3600 and len(server.seen) == 1


def test_run_creation_is_retried_only_with_an_idempotency_key() -> None:
    busy = Reply(503, {"code": "unavailable", "detail": "busy"}, {"Retry-After": "0"})
    created = Reply(201, {"id": str(uuid.uuid4()), "status": "pending"})
    with Scripted([busy, created]) as server, AgentFlowClient(server.url, retry_policy=FAST) as client:
        with pytest.raises(errors.Unavailable):
            client.runs.create("w", {})
        assert len(server.seen) == 1  # a POST without a key may have started a run: never repeated
    with Scripted([busy, busy, created]) as server, AgentFlowClient(server.url, retry_policy=FAST) as client:
        run = client.runs.create("w", {}, idempotency_key="order-7")
        assert run.created and len(server.seen) == 3
        assert {s.headers["idempotency-key"] for s in server.seen} == {"order-7"}
    # A connection dropped after the request was sent: retried with a key, not without.
    with Scripted([Reply(drop=True), created]) as server, AgentFlowClient(server.url, retry_policy=FAST) as client:
        with pytest.raises(errors.TransportError):
            client.runs.create("w", {})
        assert len(server.seen) == 1
    with Scripted([Reply(drop=True), created]) as server, AgentFlowClient(server.url, retry_policy=FAST) as client:
        assert client.runs.create("w", {}, idempotency_key="k").created and len(server.seen) == 2


def test_transport_error_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with AgentFlowClient(url, retry_policy=FAST) as client, pytest.raises(errors.TransportError) as refused:
        client.runs.get("r1")
    assert not isinstance(refused.value, errors.RequestTimeout | errors.APIError)
    assert isinstance(refused.value.__cause__, httpx.ConnectError)
    assert url in str(refused.value) and time.monotonic() - started < 5


def test_timeouts_per_call_client_default_and_none() -> None:
    slow = [Reply(delay=1.0) for _ in range(4)]
    with Scripted(slow) as server, AgentFlowClient(server.url, timeout=0.3, max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(errors.RequestTimeout) as timed_out:
            client.runs.get("r1")  # NOT_GIVEN: the client's 0.3 s
        assert time.monotonic() - started < 0.9 and isinstance(timed_out.value, TimeoutError)
        with pytest.raises(errors.RequestTimeout):
            client.runs.get("r1", timeout=NOT_GIVEN)
        assert client.runs.get("r1", timeout=None).status == "running"  # no timeout at all
        assert client.runs.get("r1", timeout=5).status == "running"  # longer than the client's
    with Scripted([Reply(delay=1.0)]) as server, AgentFlowClient(server.url, timeout=None, max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(errors.RequestTimeout):
            client.runs.get("r1", timeout=httpx.Timeout(0.2))
        assert time.monotonic() - started < 0.9


def _sse(event: dict[str, Any]) -> list[str]:
    return [f"id: {event['cursor']}", f"event: {event['type']}", f"data: {json.dumps(event)}", ""]


def _event(cursor: int, kind: str, run_id: str) -> dict[str, Any]:
    return {"cursor": cursor, "type": kind, "ts": "2026-01-01T00:00:00Z", "run_id": run_id, "workflow": "w",
            "step_id": None, "data": {}}  # fmt: skip


def test_event_streams_reconnect_after_the_last_cursor_and_skip_repeats() -> None:
    run_id = str(uuid.uuid4())
    e = [_event(c, k, run_id) for c, k in [(10, "run.created"), (11, "run.started"), (12, "step.scheduled"),
                                            (13, "step.succeeded"), (14, "run.succeeded")]]  # fmt: skip
    replies = [
        Reply(
            sse=[
                "retry: 2000",
                "",
                ": keepalive",
                "",
                *_sse(e[0]),
                *_sse(e[1]),
                "event: error",
                'data: {"code": "slow_consumer", "detail": "buffer full; reconnect with after=11"}',
                "",
            ]
        ),
        Reply(503, {"code": "unavailable", "detail": "restarting"}, {"Retry-After": "0"}),
        Reply(sse=[*_sse(e[1]), *_sse(e[2]), "data: {partial"]),  # a repeat, then a cut mid-message
        Reply(sse=[*_sse(e[3]), *_sse(e[4]), *_sse(_event(15, "after.the.end", run_id))]),
    ]
    with Scripted(replies) as server, AgentFlowClient(server.url, retry_policy=FAST) as client:
        got = list(client.runs.events(run_id))
    assert [x.cursor for x in got] == [10, 11, 12, 13, 14]  # nothing repeated, nothing after the terminal event
    assert [s.query.get("after") for s in server.seen] == [None, ["11"], ["11"], ["12"]]
    assert all(s.headers["accept"] == "text/event-stream" for s in server.seen)


async def test_async_event_stream_reconnects_and_async_retries() -> None:
    run_id = str(uuid.uuid4())
    replies = [
        Reply(sse=_sse(_event(1, "run.created", run_id))),
        Reply(drop=True),
        Reply(sse=_sse(_event(2, "run.failed", run_id))),
    ]
    with Scripted(replies) as server:
        async with AsyncAgentFlowClient(server.url, retry_policy=FAST) as client:
            got = [x.type async for x in client.runs.events(run_id)]
    assert got == ["run.created", "run.failed"]
    assert [s.query.get("after") for s in server.seen] == [None, ["1"], ["1"]]
    with Scripted([Reply(503, {"code": "unavailable", "detail": "x"}, {"Retry-After": "0"}), Reply()]) as server:
        async with AsyncAgentFlowClient(server.url, retry_policy=FAST) as client:
            assert (await client.runs.get("r")).status == "running" and len(server.seen) == 2
    with pytest.raises(errors.TransportError):
        async with AsyncAgentFlowClient(f"http://127.0.0.1:{free_port()}", retry_policy=FAST) as client:
            await client.runs.get("r")


def test_parse_retry_after_and_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    for bad in (None, "", "soon", "-1", "nan"):
        assert parse_retry_after(bad, now) is None
    monkeypatch.setenv("AGENTFLOW_URL", "http://example.invalid:1234/")
    monkeypatch.setenv("AGENTFLOW_TOKEN", "from-env")
    with AgentFlowClient() as client:
        assert client.base_url == "http://example.invalid:1234"
        assert client._headers["Authorization"] == "Bearer from-env"
    with pytest.raises(errors.ConfigurationError):
        AgentFlowClient("example.com")


def test_error_mapping_prefers_the_code_and_falls_back_to_the_status() -> None:
    cases: list[tuple[int, dict[str, Any], type[errors.APIError]]] = [
        (422, {"code": "not_canonicalizable", "detail": "x"}, errors.CanonicalizationError),
        (422, {"code": "envelope_rejected", "detail": "x"}, errors.EnvelopeRejected),
        (422, {"code": "something_new", "detail": "x"}, errors.ValidationFailed),
        (409, {"code": "conflict", "detail": "x"}, errors.Conflict),
        (410, {"code": "gone", "detail": "x"}, errors.CursorExpired),
        (413, {"code": "payload_too_large", "detail": "x"}, errors.PayloadTooLarge),
        (500, {"code": "internal", "detail": "internal error"}, errors.APIError),
        (502, {"code": "not_found", "detail": "x"}, errors.APIError),  # a code whose status disagrees
    ]
    replies = [Reply(status, body) for status, body, _ in cases]
    with Scripted(replies) as server, AgentFlowClient(server.url, max_retries=0) as client:
        for status, body, cls in cases:
            with pytest.raises(errors.APIError) as raised:
                client.runs.get("r")
            assert type(raised.value) is cls and raised.value.status == status
            assert raised.value.code == body["code"] and raised.value.detail == body["detail"]
