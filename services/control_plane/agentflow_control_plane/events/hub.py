"""Live delivery of run events to the streams connected to this process.

One hub per control plane LISTENs for the sequencer's NOTIFY (and polls, in case a
notification is missed while its connection is down), reads each new batch of events
once, and hands every event to the subscriptions that want it. Subscriptions are bounded
queues filled without waiting: a client that reads too slowly overflows its own queue and
is disconnected (it resumes with ``after=``), and nothing it does can slow the hub, let
alone the engine, which never waits on streams at all.

A stream first replays history from Postgres up to the hub's position, then subscribes
at exactly that position (see :meth:`EventHub.follow`): no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from agentflow_bus.tasks import stop_task
from agentflow_control_plane.db.session import pg_autocommit
from agentflow_control_plane.events.store import CHANNEL, EventFilter, StoredEvent, positions, read_events, read_new

log = logging.getLogger("agentflow.events")

PAGE = 500


class SlowConsumer(Exception):
    """The subscription's buffer filled up: the client reads slower than events arrive."""

    def __init__(self, buffered: int) -> None:
        super().__init__(f"slow consumer: more than {buffered} events waiting")
        self.buffered = buffered


class HubClosed(Exception):
    """This process is shutting down."""


class BadCursor(Exception):
    """``after`` names a cursor the stream cannot resume from (``gone``: deleted by retention)."""

    def __init__(self, message: str, *, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(eq=False, slots=True)
class Subscription:
    filter: EventFilter
    queue: asyncio.Queue[StoredEvent]
    limit: int
    overflowed: bool = False
    closed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: StoredEvent) -> None:
        if self.overflowed or self.closed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.wake.set()


class EventHub:
    def __init__(self, engine: AsyncEngine, dsn: str, *, buffer: int = 1000, poll_s: float = 1.0) -> None:
        self._engine = engine
        self._dsn = dsn
        self._buffer = buffer
        self._poll_s = poll_s
        #: the highest cursor handed to subscriptions (every event up to it is committed)
        self.position = 0
        self._subs: dict[str, set[Subscription]] = {}
        self._notified = asyncio.Event()
        #: the highest cursor announced by NOTIFY (its payload)
        self._announced = 0
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._closing = False

    async def start(self) -> None:
        async with pg_autocommit(self._engine) as conn:
            self.position = (await positions(conn))[0]
        self._task = asyncio.create_task(self._loop(), name="event-hub")

    async def stop(self) -> None:
        self._closing = True
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                sub.wake.set()
        await stop_task(self._task)
        await self._close_listener()

    @property
    def connections(self) -> int:
        return sum(len(s) for s in self._subs.values())

    # --- feeding ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = await asyncpg.connect(self._dsn)
        await self._listener.add_listener(CHANNEL, self._on_notify)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._announced = max(self._announced, int(payload))
        self._notified.set()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)
            self._listener = None

    async def poll(self, *, announced_only: bool = False) -> int:
        """Read events after :attr:`position` and hand them out. Returns how many.
        ``announced_only``: with no stream open, trust NOTIFY's cursor (no query)."""
        total = 0
        if announced_only and not self._subs:
            self.position = max(self.position, self._announced)
            return 0
        async with pg_autocommit(self._engine) as conn:
            while True:
                if not self._subs:
                    # Nobody listens: only keep the position (new streams start there).
                    last = (await positions(conn))[0]
                    if not self._subs:
                        self.position = max(self.position, last)
                        return total
                    continue  # a stream subscribed at the old position meanwhile: feed it
                batch = await read_new(conn, self.position, PAGE * 4)
                for event in batch:
                    for sub in self._subs.get(event.tenant, ()):
                        if sub.filter.matches(event):
                            sub.offer(event)
                if batch:
                    self.position = batch[-1].cursor
                total += len(batch)
                if len(batch) < PAGE * 4:
                    return total

    async def _loop(self) -> None:
        while True:
            try:
                await self._listen()
            except Exception as exc:  # Postgres away: keep polling; LISTEN again next round
                log.warning("LISTEN %s failed (%s); polling instead", CHANNEL, exc)
                await self._close_listener()
            notified = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._notified.wait(), self._poll_s)
                notified = True
            self._notified.clear()
            try:
                await self.poll(announced_only=notified)
            except Exception as exc:
                log.warning("reading run events failed (%s); retrying", exc)
                await asyncio.sleep(0.5)

    # --- streams ---------------------------------------------------------------------------

    def _subscribe(self, flt: EventFilter) -> Subscription:
        sub = Subscription(flt, asyncio.Queue(self._buffer), self._buffer)
        self._subs.setdefault(flt.tenant, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.filter.tenant)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.filter.tenant]

    async def check_cursor(self, after: int) -> None:
        async with pg_autocommit(self._engine) as conn:
            last, pruned = await positions(conn)
        if 0 < after < pruned:  # 0 asks for whatever is kept: no gap to report
            raise BadCursor(
                f"events up to cursor {pruned} were deleted by retention; cursor {after} cannot be resumed "
                f"without a gap (start again without 'after', or with after={pruned})", gone=True,
            )  # fmt: skip
        if after > last:
            raise BadCursor(f"cursor {after} is ahead of the stream (the last event is {last})", gone=False)

    async def history(
        self, flt: EventFilter, after: int, limit: int, *, upto: int | None = None
    ) -> tuple[list[StoredEvent], int]:
        """Events after ``after`` up to ``upto`` (default: the hub's position; never wait),
        and the cursor to ask from next time: the last one returned, or ``upto`` when fewer
        than ``limit`` matched (nothing up to there is missing)."""
        upto = self.position if upto is None else upto
        async with pg_autocommit(self._engine) as conn:
            events = await read_events(conn, flt, after, upto, limit)
        if len(events) == limit:
            return events, events[-1].cursor
        return events, max(after, upto)

    async def follow(self, flt: EventFilter, after: int, *, idle_s: float = 15.0) -> AsyncIterator[StoredEvent | None]:
        """Every event matching ``flt`` after cursor ``after``: history first, then live;
        ``None`` after ``idle_s`` without one (for keepalives and disconnect checks).

        History is read up to the hub's position; once a read ends exactly there (no await
        between that check and subscribing), the subscription takes over from it.
        Raises :class:`SlowConsumer` or :class:`HubClosed`.
        """
        if self._closing:
            raise HubClosed
        cursor = after
        while True:
            horizon = self.position
            if cursor > horizon:  # another process's hub handed this cursor out first
                await asyncio.sleep(0.05)
                continue
            while cursor < horizon:
                async with pg_autocommit(self._engine) as conn:
                    page = await read_events(conn, flt, cursor, horizon, PAGE)
                for event in page:
                    yield event
                cursor = page[-1].cursor if len(page) == PAGE else horizon
            if self.position == cursor:
                break
        sub = self._subscribe(flt)
        try:
            while True:
                if sub.overflowed:
                    raise SlowConsumer(sub.limit)
                if sub.closed:
                    raise HubClosed
                if sub.queue.empty():
                    sub.wake.clear()
                    getter = asyncio.ensure_future(sub.queue.get())
                    waker = asyncio.ensure_future(sub.wake.wait())
                    try:
                        await asyncio.wait({getter, waker}, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waker.cancel()
                        if not getter.done():
                            getter.cancel()
                    if not getter.done() or getter.cancelled():
                        if not waker.done() or waker.cancelled():
                            yield None  # idle
                        continue
                    event = getter.result()
                else:
                    event = sub.queue.get_nowait()
                if event.cursor > cursor:
                    cursor = event.cursor
                    yield event
        finally:
            self._unsubscribe(sub)
