"""The retry budget (pure logic, a fake clock)."""

from __future__ import annotations

from core.retry_budget import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_retries_are_bounded_by_a_share_of_first_calls() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, max_tokens=10.0, clock=clock)
    allowed = 0
    for _ in range(1000):  # every call fails and wants a retry
        budget.deposit()
        allowed += budget.withdraw()
    assert 200 <= allowed <= 210  # 20 % of 1000, plus the starting balance of 10


def test_a_quiet_service_can_still_retry_at_the_minimum_rate() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=10.0, max_tokens=10.0, clock=clock)
    while budget.withdraw():
        pass
    assert not budget.withdraw()
    clock.now += 0.1  # a tenth of a second earns one token
    assert budget.withdraw()
    assert not budget.withdraw()


def test_a_quiet_minute_stores_no_more_than_the_cap() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=10.0, max_tokens=5.0, clock=clock)
    clock.now += 60.0
    allowed = sum(budget.withdraw() for _ in range(100))
    assert allowed == 5
    assert (budget.spent, budget.refused) == (5, 95)
