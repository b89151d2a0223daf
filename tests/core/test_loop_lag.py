"""The event-loop probe (a real loop, blocked on purpose)."""

from __future__ import annotations

import asyncio
import time

from core.loop_lag import LoopLag


def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)


async def test_a_blocked_loop_is_measured_even_before_the_probe_wakes() -> None:
    lag = LoopLag(interval_s=0.002)
    lag.start()
    try:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.01)
        since = loop.time()
        block_the_loop(0.03)  # it can run nothing for 30 ms
        assert lag.stalled_ms(since) >= 27.0  # the probe is overdue: counted already
        await asyncio.sleep(0.01)
        assert lag.stalled_ms(since) >= 27.0  # and once it has woken
        after = loop.time()
        await asyncio.sleep(0.01)
        assert lag.stalled_ms(after) < lag.stalled_ms(since)  # the stall was before `after`
    finally:
        await lag.stop()


async def test_a_stall_that_began_before_the_span_counts_only_inside_it() -> None:
    lag = LoopLag(interval_s=0.002)
    lag.start()
    try:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.01)
        block_the_loop(0.04)
        since = loop.time() - 0.01  # the last 10 ms of the 40 ms stall
        await asyncio.sleep(0.005)
        assert 9.0 <= lag.stalled_ms(since) < 40.0
    finally:
        await lag.stop()


async def test_the_stalled_share_is_the_stall_over_the_window() -> None:
    lag = LoopLag(interval_s=0.002)
    lag.start()
    try:
        await asyncio.sleep(0.01)
        block_the_loop(0.05)
        await asyncio.sleep(0.005)
        assert lag.stalled_share(0.25) >= 0.18  # at least 48 of the last 250 ms
        assert lag.stalled_share(0.01) <= 1.0
    finally:
        await lag.stop()
