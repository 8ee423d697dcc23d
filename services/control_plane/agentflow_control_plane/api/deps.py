"""FastAPI dependencies: who is calling, and the data access scoped to their tenant.

Routes take one dependency, :data:`Reader` or :data:`Writer`, which authenticates the
caller and hands out a :class:`TenantRepository` bound to the caller's tenant: the one
place tenant scope is decided. It is a single async dependency on purpose: FastAPI's
dependency solving and its thread pool (for plain ``def`` dependencies) were a third of
the cost of ``POST /v1/runs``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from agentflow_control_plane.auth import Principal
from agentflow_control_plane.db.repository import TenantRepository
from agentflow_control_plane.engine.dispatcher import Dispatcher
from agentflow_control_plane.state import AppState
from agentflow_core.errors import Unavailable


@dataclass(slots=True)
class Caller:
    state: AppState
    principal: Principal
    repo: TenantRepository

    @property
    def actor(self) -> str:
        """Who did it, as audit entries name them."""
        return f"user:{self.principal.subject}"

    @property
    def dispatcher(self) -> Dispatcher:
        if self.state.dispatcher is None:
            raise Unavailable("the control plane is still connecting to Postgres and NATS")
        return self.state.dispatcher


async def _caller(request: Request, *, write: bool) -> AsyncIterator[Caller]:
    state: AppState = request.app.state.agentflow
    principal = state.verifier.verify(request.headers.get("authorization"))
    request.state.tenant = principal.tenant  # for the audit of a refusal below
    if write:
        principal.require_write()
    async with state.sessions() as session:
        yield Caller(state, principal, TenantRepository(session, principal.tenant))


async def _reader(request: Request) -> AsyncIterator[Caller]:
    async for caller in _caller(request, write=False):
        yield caller


async def _writer(request: Request) -> AsyncIterator[Caller]:
    async for caller in _caller(request, write=True):
        yield caller


Reader = Annotated[Caller, Depends(_reader)]
Writer = Annotated[Caller, Depends(_writer)]


async def _state(request: Request) -> AppState:
    state: AppState = request.app.state.agentflow
    return state


StateDep = Annotated[AppState, Depends(_state)]
