"""What the cached-score tests share: a clock they move by hand, and scores of a given age."""

from __future__ import annotations

import time

from core.domain import Side
from fallback.score_cache import CachedScore

BUY = ("BTC-USD", Side.BUY)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def score(value: float, *, age_ms: float = 0.0) -> CachedScore:
    return CachedScore(value, "champion", "v1", time.time_ns() // 1000 - int(age_ms * 1000))
