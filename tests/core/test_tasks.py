"""cancel_and_wait: the tasks end (one that swallowed a cancellation too), their errors
surface, the caller's cancellation is kept (pure asyncio, no servers)."""

from __future__ import annotations

import asyncio

import pytest

from core.tasks import RECANCEL_S, cancel_and_wait


async def test_every_task_is_cancelled_and_awaited() -> None:
    tasks = [asyncio.create_task(asyncio.sleep(60)) for _ in range(3)]
    await cancel_and_wait(*tasks, None)
    assert all(task.cancelled() for task in tasks)


async def test_a_task_that_ended_with_an_error_raises_it() -> None:
    async def fail() -> None:
        raise RuntimeError("broken")

    failed = asyncio.create_task(fail())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken"):
        await cancel_and_wait(failed, asyncio.create_task(asyncio.sleep(60)))


@pytest.mark.timed  # a stop bounded at 0.4 s
async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # cleanup that takes a while
            raise

    background = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopped_at = None
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the caller gives up on the stop
            await cancel_and_wait(background)
            stopped_at = loop.time()
    assert stopped_at is None, "the stop went on after its caller was cancelled"
    assert loop.time() - started < 0.4
    await asyncio.wait([background])  # it still ends on its own
    assert background.cancelled()


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    async def swallows_the_first() -> None:
        # As a library that catches the CancelledError mid-call and carries on.
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass
        await asyncio.Event().wait()  # until cancelled again

    stubborn = asyncio.create_task(swallows_the_first())
    await asyncio.sleep(0)
    async with asyncio.timeout(5 * RECANCEL_S):
        await cancel_and_wait(stubborn)
    assert stubborn.cancelled()
