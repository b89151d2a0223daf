import math

import numpy as np
import pytest

from quality.rolling import RollingQuality, auc, calibration_error


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half the ties, over every pair."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_counts_pairs_with_ties_as_half(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.random(400) * 0.5 + labels * 0.2, 2)  # rounded: many ties
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert auc(1 - scores, labels) == pytest.approx(1 - brute_force_auc(scores, labels), abs=1e-12)


def test_auc_needs_both_labels() -> None:
    assert math.isnan(auc(np.array([0.1, 0.9]), np.array([1, 1])))


def test_calibration_error_is_the_weighted_gap_per_bin() -> None:
    # Bin [0.2, 0.3): scores 0.25 twice, labels 0 and 1 -> gap 0.25; bin [0.9, 1]: 0.95
    # with label 1 -> gap 0.05; weights 2/3 and 1/3.
    scores = np.array([0.25, 0.25, 0.95])
    labels = np.array([0, 1, 1])
    assert calibration_error(scores, labels) == pytest.approx(2 / 3 * 0.25 + 1 / 3 * 0.05)


def test_the_window_keeps_the_latest_and_summarises_them() -> None:
    rolling = RollingQuality(window=4)
    for score, label in [(0.9, 0), (0.1, 1), (0.8, 1), (0.7, 1), (0.2, 0), (0.6, 0)]:
        rolling.add(score, label, threshold=0.65)
    summary = rolling.summary()
    # The window: (0.8, 1), (0.7, 1), (0.2, 0), (0.6, 0).
    assert summary.samples == 4
    assert rolling.labelled == 6
    assert summary.auc == 1.0
    assert summary.favourable_share == 0.5
    assert summary.trade_share == 0.5  # 0.8 and 0.7 reach 0.65
    assert summary.precision == 1.0


def test_an_empty_window_is_all_nan() -> None:
    summary = RollingQuality(window=10).summary()
    assert summary.samples == 0
    assert math.isnan(summary.auc) and math.isnan(summary.precision)
