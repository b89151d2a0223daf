"""Budget arithmetic for model calls (pure logic)."""

from __future__ import annotations

import random

import pytest

from server.deadline import Budget, model_call_timeout_ms


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
