"""``AdmissionLimit``: how many decisions may take the model path at once, adapted to how
busy this process's event loop is.

Calls wait in gRPC's own queue before any handler runs, where a fixed in-flight bound
cannot see them; the event loop thread's busy share (``core.loop_lag``) does. So the
limit moves like a congestion window (additive increase, multiplicative decrease): while
the loop was busy more than ``MAX_BUSY_SHARE`` of the last 250 ms it shrinks to ¾ of
what was in flight; when it is nearly used, it grows by a tenth; ``max_in_flight`` is
the ceiling, ``MIN_IN_FLIGHT`` the floor. A request past the limit is shed at once (the
ladder's answer, or RESOURCE_EXHAUSTED): a fast honest answer instead of a late one.
Why the busy share and not the timers' lateness, and why the floor: docs/overload.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

ADJUST_INTERVAL_S = 0.05
LAG_WINDOW_S = 0.25
DECREASE = 0.75
INCREASE = 0.1
# Past this share of the time busy, the loop's thread is the bottleneck: calls queue.
MAX_BUSY_SHARE = 0.85
# The limit never shrinks below one connection's stream cap's worth of calls: a lower
# floor shed most decisions to the cached score at the same throughput.
MIN_IN_FLIGHT = 16


class LagProbe(Protocol):
    def busy_share(self, window_s: float) -> float: ...


class AdmissionLimit:
    def __init__(
        self,
        *,
        max_in_flight: int,
        lag: LagProbe | None,
        min_in_flight: int = MIN_IN_FLIGHT,
        max_busy_share: float = MAX_BUSY_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_in_flight`` 0: no ceiling (the limit still adapts when ``lag`` is given)."""
        self._ceiling = float(max_in_flight) if max_in_flight > 0 else float("inf")
        # A floor above the ceiling would lift a shrinking limit past it.
        self._floor = min(float(max(1, min_in_flight)), self._ceiling)
        self._max_busy_share = max_busy_share
        self._lag = lag
        self._clock = clock
        self._adjusted_at = clock()
        self._peak = 0  # most in flight since the last adjustment
        self.limit = self._ceiling

    def admits(self, in_flight: int, count: int) -> bool:
        """Whether ``count`` more decisions may take the model path with ``in_flight``
        already being made. A batch larger than the limit is taken when nothing else is
        in flight."""
        self._peak = max(self._peak, in_flight)
        self._adjust()
        return in_flight == 0 or in_flight + count <= self.limit

    def _adjust(self) -> None:
        now = self._clock()
        if self._lag is None or now - self._adjusted_at < ADJUST_INTERVAL_S:
            return
        self._adjusted_at = now
        peak, self._peak = self._peak, 0
        if self._lag.busy_share(LAG_WINDOW_S) > self._max_busy_share:
            self.limit = max(self._floor, min(self.limit, float(max(peak, 1))) * DECREASE)
        elif peak >= 0.8 * self.limit:
            self.limit = min(self._ceiling, self.limit + max(1.0, self.limit * INCREASE))
