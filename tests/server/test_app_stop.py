"""One component stuck in its stop does not hang the server's shutdown."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from server.stopping import bounded


@pytest.mark.timed
async def test_a_stop_that_never_ends_is_given_up_and_logged(caplog) -> None:
    cancelled = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        await bounded("feature mirror", stuck, 0.05)()
    assert time.monotonic() - started < 1.0
    assert "feature mirror did not stop within 0 s (waiting in " in caplog.text
    assert "stuck (test_app_stop.py:" in caplog.text  # where it was stuck
    await asyncio.wait_for(cancelled.wait(), 1.0)  # it was cancelled, not left running


async def test_a_stop_that_ends_in_time_is_awaited_and_its_error_raised() -> None:
    stopped: list[str] = []

    async def quick() -> None:
        stopped.append("done")

    async def failing() -> None:
        raise OSError("socket gone")

    await bounded("Redis client", quick, 1.0)()
    assert stopped == ["done"]
    with pytest.raises(OSError, match="socket gone"):
        await bounded("Redis client", failing, 1.0)()
