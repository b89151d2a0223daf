"""``RetryBudget``: retries as a bounded share of first calls (Finagle's and Linkerd's
retry budget).

Each first call deposits ``ratio`` of a token, and the budget earns ``min_per_s`` tokens a
second whatever the traffic (so a quiet service can still retry); a retry spends one
token, and is not made when there is none. The balance is capped at ``max_tokens``: a
quiet minute does not store up a burst of retries for the next outage. So when a
replica slows down for every request at once, the retries to the next one add at most
``ratio`` of the load (plus ``min_per_s``), instead of doubling it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        *,
        ratio: float,
        min_per_s: float,
        max_tokens: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._min_per_s = min_per_s
        self._max = max(max_tokens, 1.0)
        self._clock = clock
        self._tokens = self._max
        self._at = clock()
        self.spent = 0  # retries allowed so far
        self.refused = 0  # retries refused for want of a token

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._max, self._tokens + (now - self._at) * self._min_per_s)
        self._at = now

    def deposit(self) -> None:
        """A first call was made."""
        self._refill()
        self._tokens = min(self._max, self._tokens + self._ratio)

    def withdraw(self) -> bool:
        """Whether a retry may be made now (and spends its token if so)."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.spent += 1
            return True
        self.refused += 1
        return False
