"""follow_sidecar: DecisionService's readiness follows a primary that is the pod's own
sidecar (pure logic, with a fake client; the pod test plays it for real: tests/k8s)."""

from __future__ import annotations

import asyncio

import pytest

from server.readiness import follow_sidecar, until_sidecar


class Primary:
    """Connects or refuses, as a running or a stopped sidecar does."""

    def __init__(self) -> None:
        self.up = True

    async def connect(self, timeout_s: float) -> bool:
        return self.up


async def test_not_serving_only_once_the_sidecar_is_gone_long_enough_and_back_when_it_returns():
    primary, said = Primary(), []

    async def set_serving(serving: bool) -> None:
        said.append(serving)

    # Gone for 1 s leaves; the test's own waits are a tenth of that or ten times it.
    task = asyncio.create_task(follow_sidecar(primary, set_serving, 1.0, 0.01))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.1)
        assert said == []  # reachable: nothing to say
        primary.up = False  # a refused connection or two: a frontend restarting
        await asyncio.sleep(0.1)
        primary.up = True
        await asyncio.sleep(0.1)
        assert said == []
        primary.up = False  # gone for longer than gone_after_s
        await asyncio.sleep(1.5)
        assert said == [False]
        primary.up = True
        await asyncio.sleep(0.5)
        assert said == [False, True]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class Failing(Primary):
    async def connect(self, timeout_s: float) -> bool:
        raise RuntimeError("a bug in the client")


async def test_a_failure_to_look_counts_as_gone_and_does_not_end_the_following():
    said: list[bool] = []

    async def set_serving(serving: bool) -> None:
        said.append(serving)

    task = asyncio.create_task(follow_sidecar(Failing(), set_serving, 0.05, 0.01))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)
    assert said == [False] and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_pod_is_not_ready_before_its_sidecar_accepts_a_connection():
    primary = Primary()
    primary.up = False
    waiting = asyncio.create_task(until_sidecar(primary))  # type: ignore[arg-type]
    await asyncio.sleep(0.3)
    assert not waiting.done()
    primary.up = True
    await asyncio.wait_for(waiting, 5)
