"""The FastAPI application and the lifecycle of its engine tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from agentflow_bus.connection import connect, ensure_streams
from agentflow_bus.subjects import Names
from agentflow_control_plane.api.deps import StateDep
from agentflow_control_plane.api.errors import install_error_handlers
from agentflow_control_plane.api.event_routes import router as event_router
from agentflow_control_plane.api.governance_routes import router as governance_router
from agentflow_control_plane.api.graph_routes import router as graph_router
from agentflow_control_plane.api.routes import router
from agentflow_control_plane.api.schemas import ReadyOut
from agentflow_control_plane.auth import TokenVerifier
from agentflow_control_plane.db.session import make_engine, make_sessionmaker, wait_for_database
from agentflow_control_plane.engine.dispatcher import Dispatcher
from agentflow_control_plane.engine.results import ResultProcessor
from agentflow_control_plane.engine.specs import SpecCache
from agentflow_control_plane.engine.stalled import StalledStepWatch
from agentflow_control_plane.engine.timers import Timers
from agentflow_control_plane.events.hub import EventHub
from agentflow_control_plane.events.store import EventSequencer
from agentflow_control_plane.governance.anchors import AnchorPublisher
from agentflow_control_plane.governance.auth_failures import AuthFailureLog
from agentflow_control_plane.governance.budgets import BudgetCache, ReservationSweeper
from agentflow_control_plane.governance.calibration import CalibrationCache
from agentflow_control_plane.governance.costing import CostServices
from agentflow_control_plane.governance.estimates import Estimator
from agentflow_control_plane.governance.sealer import AuditSealer
from agentflow_control_plane.metrics_collector import MetricsCollector
from agentflow_control_plane.middleware import BodyLimitMiddleware, MetricsMiddleware
from agentflow_control_plane.settings import ControlPlaneSettings, get_settings, to_plain_url
from agentflow_control_plane.state import AppState
from agentflow_control_plane.tracing import TracingMiddleware
from agentflow_control_plane.tracing import setup as setup_tracing
from agentflow_control_plane.ui import mount_ui
from agentflow_core.tools_config import load_tools_config

log = logging.getLogger("agentflow.control_plane")


class ORJSONResponse(JSONResponse):
    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


async def start_engine(state: AppState) -> None:
    """Connect to Postgres and NATS (waiting for both), then start the engine loops."""
    settings = state.settings
    state.estimator.load_litellm_in_background()
    await wait_for_database(state.engine)
    state.nc = await connect(settings, name="agentflow-control-plane")
    js = state.nc.jetstream()
    await ensure_streams(js, settings)
    state.dispatcher = Dispatcher(js, state.engine, relay_after_s=settings.outbox_relay_after_s)
    state.dispatcher.start()
    state.results = ResultProcessor(state.nc, state.engine, state.dispatcher, state.specs, settings, costs=state.costs)
    await state.results.start()
    state.timers = Timers(
        state.engine, state.dispatcher, state.names, settings.timer_interval_s, nc=state.nc, specs=state.specs,
        governance=settings.governance_enabled, costs=state.costs,
    )  # fmt: skip
    state.timers.start()
    await StalledStepWatch(state.nc, js, state.names).start()
    state.sequencer = EventSequencer(state.engine, retention_days=settings.events_retention_days)
    state.sequencer.start()
    hub = EventHub(state.engine, to_plain_url(settings.database_url), buffer=settings.events_buffer)
    await hub.start()
    state.events = hub
    state.anchors = AnchorPublisher(
        js, state.engine, state.names, interval_s=settings.audit_anchor_interval_s,
        file=settings.audit_anchor_file, replicas=settings.stream_replicas,
    )  # fmt: skip
    await state.anchors.start()
    if state.auth_failures is not None:
        state.auth_failures.start()
    if settings.governance_enabled:
        state.sealer = AuditSealer(state.engine, interval_s=settings.audit_seal_interval_s)
        state.sealer.start()
        state.sweeper = ReservationSweeper(state.engine)
        state.sweeper.start()
    if settings.metrics_collect_interval_s > 0:
        state.collector = MetricsCollector(state, interval_s=settings.metrics_collect_interval_s)
        state.collector.start()


async def stop_engine(state: AppState) -> None:
    # The sealer goes after everything that queues entries, so their last ones are sealed.
    # Streams close first (clients reconnect elsewhere); the sequencer numbers what the
    # engine parts queued last.
    parts = (state.events, state.collector, state.auth_failures, state.anchors, state.results, state.timers,
             state.dispatcher, state.sweeper, state.sequencer, state.sealer)  # fmt: skip
    for part in parts:
        if part is not None:
            with contextlib.suppress(Exception):
                await part.stop()
    if state.nc is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(state.nc.drain(), 5)
    await state.engine.dispose()


def create_app(settings: ControlPlaneSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    tracing = setup_tracing()  # OTEL_* variables; off (no-op) unless an exporter is configured
    engine = make_engine(settings.async_database_url, pool_size=settings.db_pool_size)
    tools = load_tools_config(settings.tools_file)
    estimator = Estimator(settings.llm_prices, tools)
    state = AppState(
        settings=settings,
        names=Names(settings.nats_prefix),
        engine=engine,
        sessions=make_sessionmaker(engine),
        verifier=TokenVerifier(settings),
        specs=SpecCache(),
        tools=tools,
        estimator=estimator,
        costs=CostServices(estimator, BudgetCache(), CalibrationCache()) if settings.governance_enabled else None,
        auth_failures=AuthFailureLog(
            engine, interval_s=settings.audit_auth_flush_s, enabled=settings.governance_enabled
        ),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Serve /healthz and /readyz (503) while Postgres or NATS are still unreachable.
        starting = asyncio.create_task(start_engine(state), name="engine-start")
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            await stop_engine(state)

    app = FastAPI(
        title="AgentFlow control plane",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    app.state.agentflow = state
    app.include_router(router)
    app.include_router(governance_router)
    app.include_router(graph_router)
    app.include_router(event_router)
    mount_ui(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    if tracing:
        app.add_middleware(TracingMiddleware)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], response_model=ReadyOut, responses={503: {"model": ReadyOut}})
    async def readyz(state: StateDep) -> JSONResponse:
        postgres = False
        try:
            async with asyncio.timeout(2):
                async with state.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            postgres = True
        except Exception:
            postgres = False
        nats_ok = False
        if state.nc is not None and state.nc.is_connected:
            try:
                await state.nc.flush(timeout=2)
                nats_ok = True
            except Exception:
                nats_ok = False
        ready = postgres and nats_ok
        body = ReadyOut(ready=ready, postgres=postgres, nats=nats_ok).model_dump()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
