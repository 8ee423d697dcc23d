"""Run event streams: WebSocket, Server-Sent Events, and JSON pages of history.

One path serves all three: a WebSocket upgrade streams, ``Accept: text/event-stream``
streams as SSE, anything else gets a JSON page of what is already there. Streams resume
from ``after=<cursor>`` (SSE also from ``Last-Event-ID``) with no gap and no duplicate.
A run's stream ends after the run's final event; the tenant stream never ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

from agentflow_control_plane import metrics
from agentflow_control_plane.auth import Principal
from agentflow_control_plane.events.hub import BadCursor, EventHub, HubClosed, SlowConsumer
from agentflow_control_plane.events.store import EventFilter, StoredEvent, issue_ticket, redeem_ticket
from agentflow_control_plane.state import AppState
from agentflow_core.errors import AgentFlowError, CursorExpired, NotFound, Unauthorized, Unavailable, ValidationFailed

log = logging.getLogger("agentflow.api.events")

router = APIRouter(prefix="/v1", tags=["events"])

FINAL = ("succeeded", "failed", "cancelled")
#: a run that ended longer ago than this has all its events numbered: replay, then close
SETTLED_AFTER = timedelta(minutes=1)
#: a WebSocket send that takes longer than this means the client stopped reading
SEND_TIMEOUT_S = 10.0
TYPE_PATTERN = r"^[a-z_.,]{1,200}$"
TYPE_RE = re.compile(TYPE_PATTERN)

# WebSocket close codes (4000-4999 are the application's own; see docs/api.md)
WS_FINISHED, WS_GOING_AWAY = 1000, 1001
WS_BAD_REQUEST, WS_UNAUTHORIZED, WS_FORBIDDEN, WS_NOT_FOUND, WS_GONE, WS_SLOW = 4400, 4401, 4403, 4404, 4410, 4429
WS_UNAVAILABLE, WS_INTERNAL = 4503, 1011


class TicketOut(BaseModel):
    ticket: str = Field(description="Pass as ?ticket= to an event stream within 60 s; valid once")
    expires_at: datetime


class EventOut(BaseModel):
    cursor: int
    type: str
    ts: str
    run_id: uuid.UUID
    workflow: str | None
    step_id: uuid.UUID | None
    data: dict[str, Any]


class EventPageOut(BaseModel):
    events: list[EventOut]
    next_cursor: int = Field(description="Ask with after=<next_cursor> for what comes next")


def _state(conn: Request | WebSocket) -> AppState:
    state: AppState = conn.app.state.agentflow
    return state


def _hub(state: AppState) -> EventHub:
    hub = state.events
    if hub is None:
        raise Unavailable("the control plane is still connecting to Postgres and NATS")
    return hub


async def _principal(state: AppState, authorization: str | None, ticket: str | None) -> Principal:
    if authorization:
        return state.verifier.verify(authorization)
    if ticket:
        redeemed = await redeem_ticket(state.engine, ticket)
        if redeemed is None:
            raise Unauthorized("event-stream ticket is unknown, used or expired (tickets last 60 s and work once)")
        tenant, subject, roles = redeemed
        return Principal(subject, tenant, roles)
    raise Unauthorized("missing credentials: send 'Authorization: Bearer <token>' or ?ticket=<ticket>")


async def _history_end(state: AppState, tenant: str, run_id: uuid.UUID) -> int | None:
    """Where a finished run's stream ends: its final event's cursor, or (for a run that
    ended long ago, whose final event retention may have deleted) the hub's position.
    None while the run's stream must follow live. 404 for a run this tenant does not have."""
    async with state.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT r.status, r.finished_at, (SELECT max(e.cursor) FROM events e WHERE e.tenant_id ="
                    " r.tenant_id AND e.run_id = r.id AND e.type IN ('run.succeeded', 'run.failed', 'run.cancelled'))"
                    " FROM runs r WHERE r.id = :id AND r.tenant_id = :tenant"
                ),
                {"id": run_id, "tenant": tenant},
            )
        ).first()
    if row is None:
        raise NotFound(f"run {run_id} not found")
    status, finished, final_cursor = row
    if status not in FINAL:
        return None
    if final_cursor is not None:
        return int(final_cursor)
    if finished is not None and finished < datetime.now(UTC) - SETTLED_AFTER:
        return _hub(state).position
    return None


def _types(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(t for t in (part.strip() for part in value.split(",")) if t)


def _after(value: str | None, field: str) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 19:
        raise ValidationFailed(f"{field} must be a non-negative integer cursor", details=[
            {"loc": f"query.{field}", "msg": "must be a non-negative integer"}])  # fmt: skip
    return int(value)


async def _start(state: AppState, flt: EventFilter, after: int | None) -> int:
    """Where a stream starts: ``after`` (checked), else a run's beginning or the tenant's now."""
    hub = _hub(state)
    if after is None:
        return 0 if flt.run_id is not None else hub.position
    await hub.check_cursor(after)
    return after


async def _events(
    hub: EventHub, flt: EventFilter, after: int, *, history_end: int | None
) -> AsyncIterator[StoredEvent | None]:
    """A run stream stops after its final event. A finished run's stream is its history
    after ``after`` up to ``history_end`` (empty when ``after`` is already there)."""
    if history_end is not None:
        cursor = after
        while cursor < history_end:
            page, cursor = await hub.history(flt, cursor, 500, upto=history_end)
            for event in page:
                yield event
        return
    async for item in hub.follow(flt, after):
        yield item
        if item is not None and flt.run_id is not None and item.final:
            return


# --- tickets and JSON pages ---------------------------------------------------------------


@router.post("/events/tickets", response_model=TicketOut, status_code=201)
async def create_ticket(request: Request) -> TicketOut:
    """A single-use ticket for one event stream, for clients that cannot send headers
    (a browser's WebSocket or EventSource)."""
    state = _state(request)
    principal = state.verifier.verify(request.headers.get("authorization"))
    ticket, expires = await issue_ticket(state.engine, tenant=principal.tenant, subject=principal.subject,
                                         roles=principal.roles)  # fmt: skip
    return TicketOut(ticket=ticket, expires_at=expires)


def _page(events: list[StoredEvent], next_cursor: int) -> Response:
    body = b'{"events":[' + b",".join(e.wire for e in events) + b'],"next_cursor":' + str(next_cursor).encode() + b"}"
    return Response(body, media_type="application/json")


def _wants_sse(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


async def _http(
    request: Request,
    flt_of: Callable[[str], EventFilter],
    after: str | None,
    limit: int,
    ticket: str | None,
    run_id: uuid.UUID | None,
) -> Response:
    state = _state(request)
    principal = await _principal(state, request.headers.get("authorization"), ticket)
    request.state.tenant = principal.tenant
    flt: EventFilter = flt_of(principal.tenant)
    hub = _hub(state)
    history_end = None
    if run_id is not None:
        history_end = await _history_end(state, principal.tenant, run_id)
    sse = _wants_sse(request)
    cursor = _after(after, "after")
    if cursor is None and sse:
        cursor = _after(request.headers.get("last-event-id") or None, "Last-Event-ID")
    try:
        if not sse:
            if cursor is not None:
                await hub.check_cursor(cursor)
            events, next_cursor = await hub.history(flt, cursor or 0, limit)
            return _page(events, next_cursor)
        start = await _start(state, flt, cursor)
    except BadCursor as exc:
        raise _cursor_error(exc) from exc
    scope = "run" if run_id is not None else "tenant"
    return StreamingResponse(
        _sse(request, hub, flt, start, history_end, scope),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _cursor_error(exc: BadCursor) -> AgentFlowError:
    if exc.gone:
        return CursorExpired(str(exc))
    return ValidationFailed(str(exc), details=[{"loc": "query.after", "msg": str(exc)}])


async def _sse(request: Request, hub: EventHub, flt: EventFilter, start: int, history_end: int | None,
               scope: str) -> AsyncIterator[bytes]:  # fmt: skip
    gauge = metrics.EVENT_STREAM_CONNECTIONS.labels("sse", scope)
    gauge.inc()
    last = start
    try:
        yield b"retry: 2000\n\n"
        async for event in _events(hub, flt, start, history_end=history_end):
            if event is None:
                if await request.is_disconnected():
                    return
                yield b": keepalive\n\n"
                continue
            last = event.cursor
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (event.cursor, event.type.encode(), event.wire)
    except SlowConsumer as exc:
        detail = {"code": "slow_consumer", "detail": f"{exc}; reconnect with after={last}", "resume_after": last}
        yield b"event: error\ndata: " + orjson.dumps(detail) + b"\n\n"
    except HubClosed:
        detail = {"code": "going_away", "detail": f"server shutting down; reconnect with after={last}",
                  "resume_after": last}  # fmt: skip
        yield b"event: error\ndata: " + orjson.dumps(detail) + b"\n\n"
    finally:
        gauge.dec()


Limit = Annotated[int, Query(ge=1, le=5000, description="JSON pages: most events returned")]


@router.get("/runs/{run_id}/events", response_model=EventPageOut)
async def run_events(
    run_id: uuid.UUID,
    request: Request,
    after: Annotated[str | None, Query(description="resume after this cursor")] = None,
    limit: Limit = 500,
    ticket: str | None = None,
) -> Response:
    """A run's events: SSE with ``Accept: text/event-stream`` (ends after the run's final
    event), a JSON page otherwise, a WebSocket on upgrade."""
    return await _http(request, lambda tenant: EventFilter(tenant, run_id=run_id), after, limit, ticket, run_id)


@router.get("/events", response_model=EventPageOut)
async def tenant_events(
    request: Request,
    after: Annotated[str | None, Query(description="resume after this cursor; 0 replays what is retained")] = None,
    run_id: uuid.UUID | None = None,
    workflow: Annotated[str | None, Query(max_length=128)] = None,
    type: Annotated[str | None, Query(pattern=TYPE_PATTERN, description="type prefixes, e.g. run.,step.failed")] = None,
    limit: Limit = 500,
    ticket: str | None = None,
) -> Response:
    """The tenant's events, optionally narrowed to a run, a workflow or type prefixes.
    Without ``after``, an SSE or WebSocket stream starts with live events."""

    def flt(tenant: str) -> EventFilter:
        return EventFilter(tenant, run_id=run_id, workflow=workflow, types=_types(type))

    return await _http(request, flt, after, limit, ticket, None)


# --- WebSocket ----------------------------------------------------------------------------


async def _ws_close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        # Close reasons are limited to 123 bytes by the protocol.
        await websocket.close(code, reason.encode()[:123].decode(errors="ignore"))


def _ws_code(exc: AgentFlowError) -> int:
    return {401: WS_UNAUTHORIZED, 403: WS_FORBIDDEN, 404: WS_NOT_FOUND, 410: WS_GONE, 503: WS_UNAVAILABLE}.get(
        exc.status_code, WS_BAD_REQUEST
    )


async def _ws(websocket: WebSocket, run_id: str | None) -> None:
    state = _state(websocket)
    await websocket.accept()
    q = websocket.query_params
    try:
        principal = await _principal(state, websocket.headers.get("authorization"), q.get("ticket"))
        rid: uuid.UUID | None = None
        history_end = None
        if run_id is not None:
            try:
                rid = uuid.UUID(run_id)
            except ValueError:
                raise ValidationFailed(f"run id {run_id!r} is not a UUID") from None
            history_end = await _history_end(state, principal.tenant, rid)
            flt = EventFilter(principal.tenant, run_id=rid)
        else:
            kind = q.get("type")
            if kind is not None and not TYPE_RE.fullmatch(kind):
                raise ValidationFailed("type must be comma-separated event type prefixes like 'run.,step.failed'")
            workflow = q.get("workflow") or None
            if workflow is not None and len(workflow) > 128:
                raise ValidationFailed("workflow must be at most 128 characters")
            run_filter = q.get("run_id")
            try:
                rid = uuid.UUID(run_filter) if run_filter else None
            except ValueError:
                raise ValidationFailed(f"run_id {run_filter!r} is not a UUID") from None
            flt = EventFilter(principal.tenant, run_id=rid, workflow=workflow, types=_types(kind))
        try:
            start = await _start(state, flt, _after(q.get("after"), "after"))
        except BadCursor as exc:
            raise _cursor_error(exc) from exc
    except AgentFlowError as exc:
        if exc.status_code in (401, 403) and state.auth_failures is not None:
            state.auth_failures.note(tenant=None, status=exc.status_code, reason=exc.message,
                                     client=websocket.client.host if websocket.client else "?",
                                     path=websocket.url.path)  # fmt: skip
        await _ws_close(websocket, _ws_code(exc), exc.message)
        return
    await _ws_stream(websocket, _hub(state), flt, start, history_end, "run" if run_id is not None else "tenant")


async def _ws_stream(websocket: WebSocket, hub: EventHub, flt: EventFilter, start: int, history_end: int | None,
                     scope: str) -> None:  # fmt: skip
    gauge = metrics.EVENT_STREAM_CONNECTIONS.labels("ws", scope)
    gauge.inc()
    last = start
    # The client sends nothing; reading is how a close from its side is noticed.
    reader = asyncio.ensure_future(_drain(websocket))
    try:
        async for event in _events(hub, flt, start, history_end=history_end):
            if reader.done():
                return
            if event is None:
                continue
            try:
                await asyncio.wait_for(websocket.send_text(event.wire.decode()), SEND_TIMEOUT_S)
            except TimeoutError:
                raise SlowConsumer(0) from None
            last = event.cursor
        await _ws_close(websocket, WS_FINISHED, "run finished")
    except SlowConsumer:
        await _ws_close(websocket, WS_SLOW, f"slow consumer: reconnect with after={last}")
    except HubClosed:
        await _ws_close(websocket, WS_GOING_AWAY, f"server shutting down: reconnect with after={last}")
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    except Exception:
        log.exception("event stream failed")
        await _ws_close(websocket, WS_INTERNAL, f"internal error: reconnect with after={last}")
    finally:
        reader.cancel()
        gauge.dec()


async def _drain(websocket: WebSocket) -> None:
    with contextlib.suppress(Exception):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


@router.websocket("/runs/{run_id}/events")
async def run_events_ws(websocket: WebSocket, run_id: str) -> None:
    await _ws(websocket, run_id)


@router.websocket("/events")
async def tenant_events_ws(websocket: WebSocket) -> None:
    await _ws(websocket, None)
