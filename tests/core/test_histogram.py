"""``Buckets``: Prometheus's ``le`` semantics, cumulative counts and the sum."""

from __future__ import annotations

import pytest

from core.histogram import Buckets


def test_a_value_on_a_bound_counts_in_that_bound_and_every_higher_one() -> None:
    buckets = Buckets((0.1, 0.5, 1.0))
    for value in (0.05, 0.1, 0.3, 1.0, 7.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.1", 2), ("0.5", 3), ("1.0", 4), ("+Inf", 5)]
    assert buckets.count == 5
    assert buckets.total == pytest.approx(8.45)


def test_nothing_observed_reads_as_zeros() -> None:
    assert Buckets((1, 2)).cumulative() == [("1.0", 0), ("2.0", 0), ("+Inf", 0)]


@pytest.mark.parametrize("bounds", [(1.0, 0.5), (0.5, 0.5)])
def test_bounds_must_rise(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Buckets(bounds)


def test_quantile_bound_is_the_upper_bound_of_the_quantiles_bucket() -> None:
    from core.histogram import quantile_bound

    bounds = (0.001, 0.005, 0.01)
    assert quantile_bound(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile_bound(bounds, [50, 49, 1, 0], 0.5) == 0.001
    assert quantile_bound(bounds, [50, 49, 1, 0], 0.51) == 0.005
    assert quantile_bound(bounds, [50, 49, 1, 0], 0.99) == 0.005
    assert quantile_bound(bounds, [50, 49, 0, 1], 1.0) == float("inf")
