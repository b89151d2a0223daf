"""``RollingQuality``: how well one scorer's recent scores ranked and sized the outcomes."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

CALIBRATION_BINS = 10


@dataclass(frozen=True, slots=True)
class QualitySummary:
    samples: int  # labelled decisions in the window
    favourable_share: float  # share whose label is 1
    auc: float  # NaN unless both labels are in the window
    precision: float  # share of label 1 among the scores at or above their threshold; NaN if none
    trade_share: float  # share of scores at or above their threshold
    calibration_error: float  # expected calibration error over 10 equal-width score bins


def auc(scores: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores sharing their rank); NaN
    when only one label is present."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based average ranks
    rank_sum = float(ranks[labels == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def calibration_error(scores: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> float:
    """Expected calibration error: per equal-width score bin, the gap between the mean
    score and the share of label 1, weighted by the bin's share of the samples."""
    bins = np.minimum(
        (np.clip(scores, 0.0, 1.0) * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1
    )
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        total += members.sum() * abs(float(scores[members].mean()) - float(labels[members].mean()))
    return total / len(scores)


class RollingQuality:
    """The last ``window`` labelled scores of one scorer."""

    def __init__(self, window: int) -> None:
        self._scores: deque[float] = deque(maxlen=window)
        self._labels: deque[int] = deque(maxlen=window)
        self._thresholds: deque[float] = deque(maxlen=window)
        self.labelled = 0  # since start, window or not

    def add(self, score: float, label: int, threshold: float) -> None:
        self._scores.append(score)
        self._labels.append(label)
        self._thresholds.append(threshold)
        self.labelled += 1

    def summary(self) -> QualitySummary:
        if not self._scores:
            return QualitySummary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        scores = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
        labels = np.fromiter(self._labels, dtype=np.int64, count=len(self._labels))
        flagged = scores >= np.fromiter(self._thresholds, dtype=np.float64, count=len(scores))
        return QualitySummary(
            samples=len(scores),
            favourable_share=float(labels.mean()),
            auc=auc(scores, labels),
            precision=float(labels[flagged].mean()) if flagged.any() else math.nan,
            trade_share=float(flagged.mean()),
            calibration_error=calibration_error(scores, labels),
        )
