"""One retry policy for every reconnect and retry loop: exponential backoff with jitter.

Without jitter, every process that lost the same Redis, broker or database retries at
the same instants (0.05, 0.1, 0.2 s ... after the outage began) and they all come back
together. Each delay here is drawn from [½ d, d] for the exponential step d ("equal
jitter"): never much shorter than the step, so a loop still slows down, yet spread out.

The loops it serves are not one call retried (a listener reconnecting, a poller, a
thread whose sleep must wake for a stop), so it is a delay source, not a decorator.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, *, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._initial_s = initial_s
        self._max_s = max(max_s, initial_s)
        self._step_s = initial_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def next_s(self) -> float:
        """The next delay (jittered), and the step doubles up to ``max_s``."""
        step = self._step_s
        self._step_s = min(step * 2, self._max_s)
        return step * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        """After a success: the next failure waits ``initial_s`` again."""
        self._step_s = self._initial_s
