"""follow_sidecar: DecisionService's readiness follows a primary that is the pod's own
sidecar (pure logic, with a fake client; the pod test plays it for real: tests/k8s)."""

from __future__ import annotations

import asyncio

import pytest

from server.readiness import follow_sidecar


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

    task = asyncio.create_task(follow_sidecar(primary, set_serving, 0.2, 0.01))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.1)
        assert said == []  # reachable: nothing to say
        primary.up = False  # a refused connection or two: a frontend restarting
        await asyncio.sleep(0.1)
        primary.up = True
        await asyncio.sleep(0.1)
        assert said == []
        primary.up = False  # gone for longer than gone_after_s
        await asyncio.sleep(0.4)
        assert said == [False]
        primary.up = True
        await asyncio.sleep(0.1)
        assert said == [False, True]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
