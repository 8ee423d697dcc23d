"""A low-latency JetStream pull consumer with credit-based flow control.

nats-py's ``fetch(batch=N)`` waits for the batch to fill (or its timeout to pass) once
it falls back to a lingering request, which adds the whole timeout to a lone message's
latency. This consumer instead keeps long-lived pull requests outstanding and hands each
message to the caller the moment it arrives, so latency stays at one network hop while
throughput still batches naturally (callers drain whatever has accumulated).

Credits: ``max_inflight`` bounds delivered-but-unfinished plus requested-but-undelivered
messages; the caller reports finished messages with :meth:`PullConsumer.done`, and a new
request is issued once half the credit is free. Request-expiry status messages (408/409)
return the undelivered credit; a watchdog re-issues requests lost to a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agentflow_bus.tasks import stop_task

log = logging.getLogger("agentflow.bus.pull")


class PullConsumer:
    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        durable: str,
        on_message: Callable[[Msg], None],
        max_inflight: int,
        expires_s: float = 5.0,
    ) -> None:
        self._nc = nc
        self._api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._on_message = on_message
        self._max_inflight = max(1, max_inflight)
        self._expires_s = expires_s
        self._outstanding = 0
        self._inflight = 0
        self._last_request = 0.0
        self._inbox = ""
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._paused = False
        self._requests: set[asyncio.Future[None]] = set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._handle, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        self._watchdog = asyncio.create_task(self._watch(), name=f"pull-watchdog {self._api_subject}")
        self._request_more(force=True)

    async def stop(self) -> None:
        """Stop requesting; messages already delivered stay with the caller."""
        self._paused = True
        await stop_task(self._watchdog)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def done(self, n: int = 1) -> None:
        """Report ``n`` delivered messages as finished (acked, nacked or terminated)."""
        self._inflight = max(0, self._inflight - n)
        self._request_more()

    def _request_more(self, *, force: bool = False) -> None:
        if self._paused or not self._nc.is_connected:
            return
        free = self._max_inflight - self._inflight - self._outstanding
        if free <= 0:
            return
        if not force and free < max(1, self._max_inflight // 2) and self._outstanding > 0:
            return
        request = {"batch": free, "expires": int(self._expires_s * 1e9)}
        self._outstanding += free
        self._last_request = time.monotonic()
        # publish() only appends to the client's write buffer; scheduling it keeps done()
        # synchronous for callers on the hot path.
        task = asyncio.ensure_future(self._nc.publish(self._api_subject, orjson.dumps(request), reply=self._inbox))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _handle(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            self._outstanding = max(0, self._outstanding - 1)
            self._inflight += 1
            try:
                self._on_message(msg)
            except Exception:
                log.exception("message handler failed; the message will be redelivered")
                self.done()
            return
        if status == "100":  # idle heartbeat
            return
        # 404/408/409: a request ended; its undelivered credit comes back.
        pending = headers.get("Nats-Pending-Messages") if headers else None
        if pending is not None and pending.isdigit():
            self._outstanding = max(0, self._outstanding - int(pending))
        else:
            self._outstanding = 0
        if status not in ("404", "408"):
            log.debug("pull request ended with status %s %s", status, headers)
        self._request_more(force=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._expires_s / 2))
            if not self._nc.is_connected:
                continue
            overdue = time.monotonic() - self._last_request > self._expires_s + 1.0
            if overdue:
                # Requests are gone (expired unseen, or lost with a reconnect): start over.
                self._outstanding = 0
            self._request_more(force=overdue or self._outstanding == 0)
