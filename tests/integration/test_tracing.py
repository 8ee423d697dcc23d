"""OpenTelemetry end to end: one trace per run, across the control plane and the worker.

A control plane app (with its engine loops) and a :class:`Worker` run in this process on
the real Postgres and NATS, with an in-memory span exporter installed; the only simulated
part is the model server (tests/support/fake_llm.py). A run's LLM step calls the sandboxed
``code_executor`` tool, its second step runs the same tool directly: the API request, the
decisions, the dispatches, the worker's steps and the model/tool/sandbox calls must all be
in the run's one trace, linked parent to child, and nothing of another run in it.

The last test starts a control plane and a worker as processes, configured only by
``OTEL_*`` variables, and receives their spans over real OTLP/HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agentflow_bus import tracing
from agentflow_control_plane.app import create_app
from agentflow_control_plane.auth import issue_token
from agentflow_control_plane.settings import ControlPlaneSettings
from agentflow_worker.settings import WorkerSettings
from agentflow_worker.worker import Worker
from tests.support.fake_llm import FakeOpenAI
from tests.support.processes import Api, Cluster
from tests.support.services import TestEnv

PRICES = {"my-llama": {"input_per_million": 2.0, "output_per_million": 8.0}}
CODE = {"language": "python", "code": "print(6 * 7)"}


@pytest.fixture
def env(make_env: Any) -> TestEnv:
    # An installation of its own: the shared cluster's processes must not take these steps.
    made: TestEnv = make_env()
    return made


@pytest.fixture
def tenant() -> str:
    # Tenants this process has seen are cached (as created) across installations: a fresh name.
    return f"tracing-{secrets.token_hex(3)}"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "agentflow-test"}))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.install(provider)
    try:
        yield spans
    finally:
        tracing.reset()
        provider.shutdown()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def stack(env: TestEnv, tenant: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The control plane app (lifespan running) behind an in-process HTTP client, and a
    worker. Traced when the ``exporter`` fixture was set up first."""
    settings = ControlPlaneSettings(
        database_url=env.database_url, nats_url=env.services.nats_url, nats_prefix=env.prefix,
        jwt_secret=env.secret, llm_prices=PRICES,
    )  # fmt: skip
    app = create_app(settings)
    token = issue_token(env.secret, tenant=tenant, roles=["admin"], subject="test", ttl_s=3600)
    worker_settings = WorkerSettings(
        nats_url=env.services.nats_url, nats_prefix=env.prefix, worker_name="trace-worker",
        workspace_dir=str(tmp_path / "ws"), llm_prices=PRICES,
    )  # fmt: skip
    worker = Worker(worker_settings)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp",
                                   headers={"Authorization": f"Bearer {token}"}, timeout=30)  # fmt: skip
        async with client:
            deadline = time.monotonic() + 30
            while (await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "control plane not ready"
                await asyncio.sleep(0.05)
            await worker.start()
            try:
                yield client
            finally:
                await worker.stop(drain_timeout_s=2)


def workflow(fake: FakeOpenAI) -> dict[str, Any]:
    return {
        "name": "traced",
        "agents": {
            "think": {
                "type": "llm",
                "model": {"provider": "openai", "model": "my-llama", "api_base": fake.api_base},
                "prompt": "What is six times seven? Compute it with the tool.",
                "tools": ["code_executor"],
            },
            "compute": {"type": "tool", "tool": "code_executor"},
        },
        "planner": {
            "type": "fsm",
            "initial_state": "think",
            "states": {
                "think": {"agent": "think", "on_success": "compute", "on_error": "failed"},
                "compute": {"agent": "compute", "on_success": "done", "on_error": "failed"},
            },
            "final_states": ["done", "failed"],
        },
    }


FAILING = {
    "name": "traced-fail",
    "agents": {"bad": {"type": "fail", "times": 5, "retry": {"max_attempts": 1}}},
    "planner": {"type": "dag", "steps": [{"name": "only", "agent": "bad"}]},
}


async def run_to_end(client: httpx.AsyncClient, workflow_name: str, run_input: Any) -> dict[str, Any]:
    response = await client.post("/v1/runs", json={"workflow": workflow_name, "input": run_input})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while True:
        run: dict[str, Any] = (await client.get(f"/v1/runs/{run_id}")).json()
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.05)


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)


def of_run(spans: list[ReadableSpan], run_id: str) -> list[ReadableSpan]:
    return [s for s in spans if attr(s, "agentflow.run_id") == run_id]


async def spans_when(exporter: InMemorySpanExporter, ready: Any) -> list[ReadableSpan]:
    """The finished spans once ``ready(spans)`` holds: a worker ends its step span after
    publishing the result, so the run can be finished a moment before."""
    deadline = time.monotonic() + 10
    while True:
        spans = list(exporter.get_finished_spans())
        if ready(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_spans_the_control_plane_and_the_worker_for_a_run(
    exporter: InMemorySpanExporter, stack: httpx.AsyncClient, fake: FakeOpenAI, env: TestEnv, tenant: str
) -> None:
    assert tracing.ON
    client = stack
    assert (await client.put("/v1/workflows/traced", json=workflow(fake))).status_code == 200
    assert (await client.put("/v1/workflows/traced-fail", json=FAILING)).status_code == 200
    answer: list[dict[str, Any]] = [
        {"tool_calls": [{"name": "code_executor", "arguments": CODE}], "usage": {"prompt_tokens": 120,
                                                                                 "completion_tokens": 30}},
        {"content": "42", "usage": {"prompt_tokens": 200, "completion_tokens": 5}},
    ]  # fmt: skip
    runs = []
    for _ in range(2):  # one after the other: the model's script is consumed in order
        fake.script(*answer)
        run = await run_to_end(client, "traced", CODE)
        assert run["status"] == "succeeded", run
        runs.append(run["id"])
    failed = await run_to_end(client, "traced-fail", None)
    assert failed["status"] == "failed"

    def complete(spans: list[ReadableSpan]) -> bool:
        steps = named(spans, "agentflow.step")
        return all(len([s for s in steps if attr(s, "agentflow.run_id") == r]) == 2 for r in runs) and any(
            attr(s, "agentflow.run_id") == failed["id"] for s in steps
        )

    spans = await spans_when(exporter, complete)
    by_id = {span_id(s): s for s in spans}
    traces: dict[str, int] = {}

    for run_id in runs:
        [create] = [s for s in named(spans, "agentflow.run.create") if attr(s, "agentflow.run_id") == run_id]
        trace = traces[run_id] = trace_id(create)
        in_trace = [s for s in spans if trace_id(s) == trace]

        # The API request: the root, named by its route (no id in the name).
        [request] = [s for s in in_trace if s.kind == SpanKind.SERVER]
        assert request.name == "POST /v1/runs" and request.parent is None
        assert attr(request, "http.route") == "/v1/runs" and attr(request, "http.response.status_code") == 201
        assert parent_id(create) == span_id(request)
        assert (attr(create, "agentflow.tenant"), attr(create, "agentflow.workflow")) == (tenant, "traced")

        # The run keeps the creating span's context.
        [row] = await env.sql("SELECT traceparent FROM runs WHERE id = $1::uuid", run_id)
        assert create.context is not None
        assert row["traceparent"] == tracing.format_traceparent(create.context)

        # Everything carrying this run's id is in this trace, and nothing of another run is.
        assert {trace_id(s) for s in of_run(spans, run_id)} == {trace}
        assert {attr(s, "agentflow.run_id") for s in in_trace} <= {run_id, None}

        dispatches = named(in_trace, "agentflow.dispatch")
        steps = named(in_trace, "agentflow.step")
        results = named(in_trace, "agentflow.result")
        decisions = named(in_trace, "agentflow.decision")
        assert (len(dispatches), len(steps), len(results), len(decisions)) == (2, 2, 2, 2)

        # Worker step spans are children of the dispatch span of their own step message.
        for step in steps:
            dispatch = by_id[parent_id(step)]  # type: ignore[index]
            assert dispatch.name == "agentflow.dispatch" and dispatch.kind == SpanKind.PRODUCER
            assert step.kind == SpanKind.CONSUMER
            assert attr(dispatch, "agentflow.step_id") == attr(step, "agentflow.step_id")
            for key in ("agentflow.tenant", "agentflow.run_id", "agentflow.agent", "agentflow.attempt"):
                assert attr(step, key) == attr(dispatch, key), key
            assert attr(step, "agentflow.worker") == "trace-worker"
            assert attr(dispatch, "agentflow.workflow") == "traced"
        first, second = sorted(dispatches, key=lambda s: s.start_time or 0)
        # The first dispatch is the creation's; the second the decision that followed step 1.
        assert parent_id(first) == span_id(create)
        assert by_id[parent_id(second)].name == "agentflow.decision"  # type: ignore[index]
        # Results and timer-less decisions hang off the run's stored context.
        for result in results:
            assert parent_id(result) == span_id(create)
            assert attr(result, "agentflow.step_status") == "succeeded"
        for decision in decisions:
            assert by_id[parent_id(decision)].name == "agentflow.result"  # type: ignore[index]
        assert sorted(attr(d, "agentflow.run_status") or "" for d in decisions) == ["", "succeeded"]

        # Inside the LLM step: two model calls and one tool call (with its sandbox run).
        think = next(s for s in steps if attr(s, "agentflow.agent") == "think")
        compute = next(s for s in steps if attr(s, "agentflow.agent") == "compute")
        chats = [s for s in in_trace if parent_id(s) == span_id(think) and s.name.startswith("chat ")]
        assert [s.name for s in chats] == ["chat my-llama", "chat my-llama"]
        assert all(s.kind == SpanKind.CLIENT for s in chats)
        usage = sorted((attr(s, "gen_ai.usage.input_tokens"), attr(s, "gen_ai.usage.output_tokens")) for s in chats)
        assert usage == [(120, 30), (200, 5)]
        assert all(attr(s, "agentflow.cost_usd") > 0 for s in chats)
        assert (attr(think, "gen_ai.usage.input_tokens"), attr(think, "gen_ai.usage.output_tokens")) == (320, 35)
        assert attr(think, "agentflow.cost_usd") == pytest.approx((320 * 2 + 35 * 8) / 1e6)
        assert attr(compute, "gen_ai.usage.input_tokens") is None  # a tool-only step: cost, no tokens
        think_result = next(r for r in results if attr(r, "agentflow.step_id") == attr(think, "agentflow.step_id"))
        assert attr(think_result, "gen_ai.usage.input_tokens") == 320
        for step in (think, compute):
            [tool] = [s for s in in_trace if parent_id(s) == span_id(step) and s.name.startswith("execute_tool")]
            assert tool.name == "execute_tool code_executor"
            assert attr(tool, "agentflow.tool_outcome") == "ok" and attr(tool, "agentflow.run_id") == run_id
            [sandbox] = [s for s in in_trace if parent_id(s) == span_id(tool)]
            assert sandbox.name == "agentflow.sandbox" and attr(sandbox, "process.exit.code") == 0
            assert sandbox.status.status_code != StatusCode.ERROR

    assert traces[runs[0]] != traces[runs[1]]

    # Errors: the failing step and the decision that failed the run are marked ERROR.
    [bad] = [s for s in named(spans, "agentflow.step") if attr(s, "agentflow.run_id") == failed["id"]]
    assert bad.status.status_code == StatusCode.ERROR and "failing on purpose" in (bad.status.description or "")
    [ending] = [s for s in named(spans, "agentflow.decision") if attr(s, "agentflow.run_id") == failed["id"]]
    assert ending.status.status_code == StatusCode.ERROR and attr(ending, "agentflow.run_status") == "failed"
    assert trace_id(bad) == trace_id(ending)


async def test_without_tracing_a_runs_trace_id_is_its_run_id(stack: httpx.AsyncClient, env: TestEnv) -> None:
    assert not tracing.ON
    spec = {"name": "plain", "agents": {"e": {"type": "echo"}},
            "planner": {"type": "dag", "steps": [{"name": "only", "agent": "e"}]}}  # fmt: skip
    assert (await stack.put("/v1/workflows/plain", json=spec)).status_code == 200
    run = await run_to_end(stack, "plain", {"x": 1})
    assert run["status"] == "succeeded", run
    [row] = await env.sql("SELECT traceparent FROM runs WHERE id = $1::uuid", run["id"])
    stored = tracing.parse(row["traceparent"])
    assert stored is not None and stored.trace_id == uuid.UUID(run["id"]).int


# --- real processes, real OTLP/HTTP export ------------------------------------------------


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.paths.add(self.path)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            attributes = {}
                            for a in span.attributes:
                                value = a.value
                                attributes[a.key] = getattr(value, value.WhichOneof("value") or "string_value")
                            receiver.spans.append({
                                "service": resource.get("service.name"), "name": span.name,
                                "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(), "attributes": attributes,
                            })  # fmt: skip
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_processes_configured_by_otel_variables_export_one_trace_per_run(env: TestEnv) -> None:
    receiver = OtlpReceiver()
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100")
        cluster.worker(name="otlp-worker", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100")
        api = Api(url, env, f"otlp-{secrets.token_hex(3)}")
        spec = {"name": "plain", "agents": {"e": {"type": "echo"}},
                "planner": {"type": "dag", "steps": [{"name": "only", "agent": "e"}]}}  # fmt: skip
        assert api.put_workflow(spec).status_code == 200
        run = api.wait(api.start("plain", {"x": 1}))
        assert run["status"] == "succeeded", cluster.logs()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            mine = [s for s in receiver.spans if s["attributes"].get("agentflow.run_id") == run["id"]]
            if {s["name"] for s in mine} >= {"agentflow.step", "agentflow.decision"}:
                break
            time.sleep(0.1)
    finally:
        cluster.close()
        receiver.close()
    assert receiver.paths == {"/v1/traces"}
    mine = [s for s in receiver.spans if s["attributes"].get("agentflow.run_id") == run["id"]]
    assert len({s["trace"] for s in mine}) == 1, mine
    by_id = {s["id"]: s for s in receiver.spans}
    [step] = [s for s in mine if s["name"] == "agentflow.step"]
    assert step["service"] == "agentflow-worker"
    dispatch = by_id[step["parent"]]
    assert (dispatch["name"], dispatch["service"]) == ("agentflow.dispatch", "agentflow-control-plane")
    create = by_id[dispatch["parent"]]
    assert create["name"] == "agentflow.run.create" and by_id[create["parent"]]["name"] == "POST /v1/runs"
    assert {s["service"] for s in mine} == {"agentflow-control-plane", "agentflow-worker"}
