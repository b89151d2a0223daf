"""Budget arithmetic for model calls, and waiting for a call without cancelling it."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from server.deadline import Budget, model_call_timeout_ms, within


def test_no_caller_deadline_uses_the_default_budget():
    budget = Budget.for_call(None, default_ms=50)
    assert 45 < budget.remaining_ms() <= 50


def test_caller_deadline_is_the_budget():
    assert 9 < Budget.for_call(0.010, default_ms=50).remaining_ms() <= 10


@pytest.mark.parametrize(
    ("remaining", "cap", "expected"),
    [(50.0, 20.0, 20.0), (10.0, 20.0, 7.0), (2.0, 20.0, -1.0)],
)
def test_call_timeout_is_budget_less_reserve_capped(remaining, cap, expected):
    got = model_call_timeout_ms(
        remaining, reserve_ms=3.0, cap_ms=cap, jitter=0.0, rng=random.Random(1)
    )
    assert got == pytest.approx(expected)


def test_jitter_only_lowers_the_cap_by_at_most_its_share():
    rng = random.Random(3)
    values = [
        model_call_timeout_ms(1000, reserve_ms=3, cap_ms=20, jitter=0.1, rng=rng)
        for _ in range(1000)
    ]
    assert min(values) >= 18.0
    assert max(values) <= 20.0
    assert len(set(values)) > 900


async def test_within_returns_at_its_timeout_however_slow_the_call_is_to_clean_up():
    """A client whose clean-up on cancellation blocks (redis-py closing its connection to
    a paused server) must not hold the caller past its timeout."""
    cleaned = asyncio.Event()

    async def slow_call() -> str:
        try:
            await asyncio.sleep(0.5)
            return "late"
        finally:
            await asyncio.sleep(0.2)  # a clean-up that takes its time
            cleaned.set()

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(slow_call(), 0.02)
    assert time.monotonic() - started < 0.15
    assert not cleaned.is_set()  # left running, not cancelled
    await asyncio.wait_for(cleaned.wait(), 2)


async def test_within_gives_the_answer_of_a_call_that_ends_in_time():
    async def quick() -> int:
        return 7

    assert await within(quick(), 1.0) == 7
