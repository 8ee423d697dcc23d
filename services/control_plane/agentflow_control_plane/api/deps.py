"""FastAPI dependencies: the app state, the caller, and the caller's tenant scope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from agentflow_core.errors import Unavailable
from fastapi import Depends, Header, Request

from agentflow_control_plane.auth import Principal
from agentflow_control_plane.db.repository import TenantRepository
from agentflow_control_plane.engine.dispatcher import Dispatcher
from agentflow_control_plane.state import AppState


# Dependencies are async on purpose: FastAPI runs plain `def` dependencies in a thread
# pool, a thread hop per request on the hot API path.
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.agentflow
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_dispatcher(state: StateDep) -> Dispatcher:
    if state.dispatcher is None:
        raise Unavailable("the control plane is still connecting to Postgres and NATS")
    return state.dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


async def get_principal(
    state: StateDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Principal:
    return state.verifier.verify(authorization)


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def require_writer(principal: CurrentPrincipal) -> Principal:
    principal.require_write()
    return principal


Writer = Annotated[Principal, Depends(require_writer)]


async def get_repo(state: StateDep, principal: CurrentPrincipal) -> AsyncIterator[TenantRepository]:
    async with state.sessions() as session:
        yield TenantRepository(session, principal.tenant)


TenantRepo = Annotated[TenantRepository, Depends(get_repo)]
