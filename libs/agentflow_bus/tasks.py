"""Stopping background loops reliably.

On Python 3.11, ``asyncio.wait_for`` returns its inner result instead of raising when a
cancellation arrives just as the inner future completes (CPython gh-86296, fixed in 3.12).
A loop that was inside such a call at ``task.cancel()`` never sees the cancellation and
goes on forever, so a single ``cancel()`` + ``await task`` can hang a shutdown. Every loop
that is stopped by cancellation goes through :func:`stop_task`, which cancels again until
the task is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

log = logging.getLogger("agentflow.tasks")

#: how often a task that swallowed its cancellation is cancelled again
_RECANCEL_S = 0.05


async def stop_task(task: asyncio.Task[object] | None, timeout_s: float = 10.0) -> None:
    """Cancel ``task`` and wait until it is done, re-cancelling if a cancellation was lost.

    Gives up (with a log line) after ``timeout_s`` so a stuck task cannot hold a shutdown
    forever. Exceptions of the task are logged, not raised: the caller is stopping.
    """
    if task is None:
        return
    deadline = time.monotonic() + timeout_s
    while not task.done():
        task.cancel()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.error("task %s did not stop within %gs", task.get_name(), timeout_s)
            return
        await asyncio.wait({task}, timeout=min(_RECANCEL_S, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())


async def stop_tasks(tasks: Iterable[asyncio.Task[object]], timeout_s: float = 10.0) -> None:
    """:func:`stop_task` for several tasks at once."""
    await asyncio.gather(*(stop_task(t, timeout_s) for t in tasks))
