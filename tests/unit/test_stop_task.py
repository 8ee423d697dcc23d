"""stop_task: a loop that swallows a cancellation (Python 3.11's wait_for race) still stops."""

from __future__ import annotations

import asyncio

from agentflow_bus.tasks import stop_task


async def test_a_loop_that_swallows_cancellations_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed >= 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await stop_task(task, timeout_s=5)
    assert task.cancelled() and swallowed == 3


async def test_gives_up_after_the_timeout_instead_of_hanging() -> None:
    release = False

    async def immortal() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if release:
                    raise

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    await stop_task(task, timeout_s=0.3)
    assert not task.done()  # abandoned (and logged), not waited on forever
    release = True
    await stop_task(task)
    assert task.cancelled()


async def test_none_and_finished_tasks_are_fine() -> None:
    await stop_task(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await stop_task(done)
    assert done.done() and not done.cancelled()
