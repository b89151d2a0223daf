"""The percentile (pure logic)."""

from __future__ import annotations

from core.stats import percentile


def test_nearest_rank_on_a_hundred_values() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0


def test_the_p99_of_a_thousand_is_the_990th_value() -> None:
    assert percentile(range(1, 1001), 0.99) == 990


def test_small_and_empty_samples() -> None:
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([1.0, 2.0], 0.5) == 1.0
    assert percentile([], 0.99) == 0.0
