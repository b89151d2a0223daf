"""Budget arithmetic for model calls, and bounded store reads."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from core import deadline
from core.deadline import Budget, CallPlan
from core.store_reads import StoreBusy, StoreReads

pytestmark = pytest.mark.timed  # budgets of a few ms, spent while the test runs


def test_no_caller_deadline_uses_the_default_budget():
    budget = CallPlan(default_budget_ms=50, response_margin_ms=0).budget(None)
    assert 45 < budget.remaining_ms() <= 50


def test_caller_deadline_is_the_budget():
    assert 9 < CallPlan(response_margin_ms=0).budget(0.010).remaining_ms() <= 10


def test_response_margin_comes_off_the_callers_deadline_only():
    plan = CallPlan(default_budget_ms=50, response_margin_ms=5)
    assert 4 < plan.budget(0.010).remaining_ms() <= 5
    assert 45 < plan.budget(None).remaining_ms() <= 50


@pytest.mark.parametrize(
    ("remaining", "cap", "expected"),
    [(50.0, 20.0, 20.0), (10.0, 20.0, 7.0), (2.0, 20.0, -1.0)],
)
def test_call_timeout_is_budget_less_reserve_capped(remaining, cap, expected):
    plan = CallPlan(model_call_ms=cap, fallback_reserve_ms=3.0, jitter=0.0)
    got = plan.model_call_timeout_ms(StoppedBudget(remaining), random.Random(1))
    assert got == pytest.approx(expected)


class StoppedBudget(Budget):
    """A budget whose clock does not run: the test reads the rule, not the machine's speed
    (a loaded runner once spent 0.5 ms between making the budget and reading it)."""

    __slots__ = ("_remaining_ms",)

    def __init__(self, remaining_ms: float) -> None:
        super().__init__(remaining_ms)
        self._remaining_ms = remaining_ms

    def remaining_ms(self) -> float:
        return self._remaining_ms


def test_jitter_only_lowers_the_cap_by_at_most_its_share():
    rng = random.Random(3)
    plan = CallPlan(model_call_ms=20, fallback_reserve_ms=3, jitter=0.1)
    values = [plan.model_call_timeout_ms(Budget(1000), rng) for _ in range(1000)]
    assert min(values) >= 18.0
    assert max(values) <= 20.0
    assert len(set(values)) > 900


async def test_a_read_returns_at_its_timeout_however_slow_the_call_is_to_clean_up():
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
        await StoreReads(cap_ms=10, max_abandoned=4).run(slow_call(), 20.0)
    assert time.monotonic() - started < 0.15
    assert not cleaned.is_set()  # left running, not cancelled
    await asyncio.wait_for(cleaned.wait(), 2)


async def test_a_read_gives_the_answer_of_a_call_that_ends_in_time():
    async def quick() -> int:
        return 7

    assert await StoreReads(cap_ms=10, max_abandoned=4).run(quick(), 1000.0) == 7


async def test_no_read_starts_while_max_abandoned_reads_still_run():
    """A hung store: reads pile up no further than the bound, and the next read starts
    again once the abandoned ones end."""
    store_wakes = asyncio.Event()
    started = 0

    async def hung_read() -> str:
        nonlocal started
        started += 1
        await store_wakes.wait()
        return "late"

    reads = StoreReads(cap_ms=10, max_abandoned=3)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await reads.run(hung_read(), 5.0)
    with pytest.raises(StoreBusy, match="3 abandoned reads"):
        await reads.run(hung_read(), 5.0)
    assert started == 3
    assert reads.abandoned == 3

    store_wakes.set()
    for _ in range(10):  # a few loop turns: the abandoned reads end
        await asyncio.sleep(0)
    assert reads.abandoned == 0
    assert await reads.run(hung_read(), 5.0) == "late"
    assert started == 4


def test_a_read_may_spend_the_budget_left_up_to_the_cap():
    reads = StoreReads(cap_ms=10, max_abandoned=3)
    assert reads.timeout_ms(StoppedBudget(50)) == 10
    assert 0 < reads.timeout_ms(StoppedBudget(4)) <= 4


@pytest.mark.parametrize(
    ("remaining_s", "expired"), [(None, False), (0.001, False), (0.0, True), (-0.5, True)]
)
def test_a_call_is_expired_once_its_deadline_has_passed(remaining_s, expired):
    assert CallPlan.expired(remaining_s) is expired


def test_a_calls_cost_is_the_processs_cpu_per_finished_call_in_a_busy_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = {"cpu": 10.0, "now": 100.0}
    monkeypatch.setattr(time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    cost = deadline.CallCost()
    assert cost.ms == deadline.INITIAL_CALL_COST_MS

    def window(cpu_ms: float, calls: int) -> None:
        for _ in range(calls - 1):
            cost.finished()
        clock["cpu"] += cpu_ms / 1000.0
        clock["now"] += 2 * deadline.CALL_COST_WINDOW_S
        cost.finished()  # the window's last call ends it

    window(cpu_ms=20.0, calls=deadline.CALL_COST_MIN_CALLS)  # 1 ms a call
    assert cost.ms == pytest.approx(1.0)
    # A quiet window (background work over a few calls) changes nothing.
    window(cpu_ms=50.0, calls=deadline.CALL_COST_MIN_CALLS - 1)
    assert cost.ms == pytest.approx(1.0)
    window(cpu_ms=40.0, calls=2 * deadline.CALL_COST_MIN_CALLS)
    assert cost.ms == pytest.approx(1.0)
    window(cpu_ms=20.0, calls=2 * deadline.CALL_COST_MIN_CALLS)
    assert cost.ms == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("budget_ms", "ahead", "refused"),
    [(38.0, 0, False), (0.5, 0, False), (38.0, 37, False), (38.0, 38, True)],
)
def test_a_call_is_refused_only_when_the_calls_ahead_outlast_its_budget(
    budget_ms: float, ahead: int, refused: bool
) -> None:
    assert deadline.outlasts_budget(budget_ms, ahead, call_ms=1.0) is refused


def test_a_replica_needs_its_recent_median_or_at_least_the_floor():
    assert deadline.model_call_needs_ms(6.2) == 6.2
    assert deadline.model_call_needs_ms(0.0) == deadline.MIN_CALL_BUDGET_MS
    assert deadline.model_call_needs_ms(2.0, floor_ms=3.0) == 3.0


def test_a_queued_request_leaves_the_expected_call_time_before_its_deadline():
    expected = deadline.ExpectedCallTime()
    assert expected.leaves_queue_at(10.0) == pytest.approx(
        10.0 - deadline.INITIAL_EXPECTED_MS / 1000
    )
    expected.answered(8.0)  # the first answer replaces the guess
    assert expected.ms == 8.0
    expected.answered(18.0)  # later ones move it by their weight
    assert expected.ms == pytest.approx(8.0 + deadline.EXPECTED_WEIGHT * 10.0)
    assert expected.leaves_queue_at(10.0) == pytest.approx(10.0 - expected.ms / 1000)


def test_a_shared_call_waits_for_its_last_deadline_never_less_than_nothing():
    assert deadline.shared_call_wait_s([1.010, 1.030, 1.020], sent_at=1.0) == pytest.approx(0.03)
    assert deadline.shared_call_wait_s([0.9, 0.95], sent_at=1.0) == 0.0


@pytest.mark.parametrize(
    ("waited_ms", "counts"), [(9.9, False), (deadline.MIN_COUNTED_TIMEOUT_MS, True), (0.0, False)]
)
def test_only_a_replica_that_had_the_floor_is_at_fault_for_a_timeout(waited_ms, counts):
    assert deadline.counts_as_timeout(waited_ms) is counts


@pytest.mark.parametrize(
    ("late_by_s", "grace_s"),
    [(0.0, 0.0), (deadline.STALLED_TIMER_S, 0.0), (0.003, deadline.STALL_GRACE_S)],
)
def test_only_a_wait_a_stall_made_late_gets_a_moment_more(late_by_s, grace_s):
    assert deadline.stall_grace_s(late_by_s) == grace_s
