"""The retry policy (pure logic)."""

from __future__ import annotations

import random

from core.backoff import Backoff


def test_delays_double_up_to_the_cap_each_jittered_within_its_upper_half() -> None:
    backoff = Backoff(initial_s=0.1, max_s=1.0, rng=random.Random(7))
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    delays = [backoff.next_s() for _ in steps]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step


def test_two_loops_that_fail_together_do_not_retry_in_lockstep() -> None:
    first = Backoff(initial_s=0.1, max_s=1.0, rng=random.Random(1))
    second = Backoff(initial_s=0.1, max_s=1.0, rng=random.Random(2))
    assert [first.next_s() for _ in range(4)] != [second.next_s() for _ in range(4)]


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(initial_s=0.1, max_s=1.0, rng=random.Random(3))
    for _ in range(5):
        backoff.next_s()
    backoff.reset()
    assert 0.05 <= backoff.next_s() <= 0.1
