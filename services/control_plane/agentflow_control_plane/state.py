"""Everything one control-plane process holds for its lifetime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from agentflow_bus.subjects import Names
from agentflow_control_plane.auth import TokenVerifier
from agentflow_control_plane.engine.dispatcher import Dispatcher
from agentflow_control_plane.engine.results import ResultProcessor
from agentflow_control_plane.engine.specs import SpecCache
from agentflow_control_plane.engine.timers import Timers
from agentflow_control_plane.events.hub import EventHub
from agentflow_control_plane.events.store import EventSequencer
from agentflow_control_plane.governance.anchors import AnchorPublisher
from agentflow_control_plane.governance.auth_failures import AuthFailureLog
from agentflow_control_plane.governance.budgets import ReservationSweeper
from agentflow_control_plane.governance.costing import CostServices
from agentflow_control_plane.governance.estimates import Estimator
from agentflow_control_plane.governance.sealer import AuditSealer
from agentflow_control_plane.settings import ControlPlaneSettings
from agentflow_core.tools_config import ToolsConfig

if TYPE_CHECKING:  # the collector reads this state: a runtime import would be circular
    from agentflow_control_plane.metrics_collector import MetricsCollector


@dataclass
class AppState:
    settings: ControlPlaneSettings
    names: Names
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    verifier: TokenVerifier
    specs: SpecCache
    #: the tools config file (the same file the workers read), for validating workflows
    tools: ToolsConfig
    #: preflight cost estimates (prices, token counter)
    estimator: Estimator
    nc: Client | None = None
    dispatcher: Dispatcher | None = None
    results: ResultProcessor | None = None
    timers: Timers | None = None
    anchors: AnchorPublisher | None = None
    auth_failures: AuthFailureLog | None = None
    sealer: AuditSealer | None = None
    #: live delivery of run events to this process's streams; their numbering
    events: EventHub | None = None
    sequencer: EventSequencer | None = None
    #: per-step estimates, budgets and calibration (None when governance is off)
    costs: CostServices | None = None
    sweeper: ReservationSweeper | None = None
    #: refreshes the queue/worker/budget/audit gauges (None when turned off)
    collector: MetricsCollector | None = None
