"""A request's time budget, and how much of it one model call may spend."""

from __future__ import annotations

import random
import time


class Budget:
    """The time a request has, on the monotonic clock, from the caller's gRPC deadline."""

    __slots__ = ("deadline",)

    def __init__(self, total_ms: float, *, started: float | None = None) -> None:
        start = time.monotonic() if started is None else started
        self.deadline = start + total_ms / 1000.0

    @classmethod
    def for_call(cls, time_remaining_s: float | None, default_ms: float) -> Budget:
        """The caller's remaining deadline, or ``default_ms`` when the call has none."""
        if time_remaining_s is None:
            return cls(default_ms)
        return cls(time_remaining_s * 1000.0)

    def remaining_ms(self) -> float:
        return (self.deadline - time.monotonic()) * 1000.0


def model_call_timeout_ms(
    remaining_ms: float,
    *,
    reserve_ms: float,
    cap_ms: float,
    jitter: float,
    rng: random.Random,
) -> float:
    """What one model call may spend: the budget less the fallback reserve, capped.

    The cap is lowered by a random share up to ``jitter`` so that many servers'
    timeouts against one slow replica do not fire in lockstep.
    """
    jittered_cap = cap_ms * (1.0 - jitter * rng.random())
    return min(remaining_ms - reserve_ms, jittered_cap)
