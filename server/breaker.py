"""An asyncio circuit breaker driven by pybreaker's state machine.

The awaited call runs outside pybreaker, whose lock must not span an ``await``; its
outcome is fed back through ``CircuitBreaker.call`` with a function that returns or
raises at once, so pybreaker makes every state change. Failures that overlap count once
(calls that fail together in one stall are one event). Half-open, it lets 1, 2, 4, ...
trial calls through as they succeed, until ``success_threshold`` successes close it.
A closed breaker also opens on rates (``RateRule``): the share of its calls in a sliding
window that failed, or that were slow, as Resilience4j judges them, so that a replica
failing half its calls between successes is isolated too. Errors for which ``ignore``
returns True are neither failure nor success. Why:
docs/architecture.md#deadlines-and-load-on-the-decide-path.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pybreaker

from core.deadline import overlaps_a_counted_failure

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
# Trial calls at once double with each success, up to 2**this.
MAX_TRIAL_DOUBLINGS = 6


@dataclass(frozen=True)
class RateRule:
    """A closed breaker opens once the calls of the last ``window_s`` seconds number at
    least ``min_calls`` and a share ``failure_rate`` or more of them failed, or a share
    ``slow_rate`` or more took ``slow_ms`` or longer (failed or not)."""

    window_s: int = 10
    min_calls: int = 20
    failure_rate: float = 0.25
    slow_rate: float = 1.0
    slow_ms: float = 20.0


@dataclass(frozen=True)
class Rates:
    calls: int
    failure_rate: float
    slow_rate: float


class CallWindow:
    """The outcomes of the calls of the last ``window_s`` seconds, in one-second buckets.

    The event loop records; the metrics thread may read ``rates`` at the same time, so a
    read sums a copy of the buckets and changes nothing."""

    def __init__(self, window_s: int) -> None:
        self._window_s = window_s
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures, slow]

    def record(self, now_s: float, *, failed: bool, slow: bool) -> None:
        second = int(now_s)
        while self._buckets and self._buckets[0][0] <= second - self._window_s:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow

    def rates(self, now_s: float) -> Rates:
        oldest = int(now_s) - self._window_s
        calls = failures = slow = 0
        for second, *counts in list(self._buckets):  # a copy: one C call under the GIL
            if second > oldest:
                calls, failures, slow = calls + counts[0], failures + counts[1], slow + counts[2]
        return Rates(calls, failures / calls, slow / calls) if calls else Rates(0, 0.0, 0.0)

    def clear(self) -> None:
        self._buckets.clear()


class BreakerOpenError(Exception):
    """The breaker rejected the call without making it."""


class _StateLogger(pybreaker.CircuitBreakerListener):
    """Opening from closed and closing at WARNING; the trials in between (open ->
    half-open -> open, every reset timeout while a replica stays down) at INFO."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
        old_name, new_name = (old.name if old else None), (new.name if new else None)
        trial = HALF_OPEN in (old_name, new_name) and new_name != CLOSED
        log.log(
            logging.INFO if trial else logging.WARNING,
            "breaker %s: %s -> %s",
            cb.name,
            old_name,
            new_name,
        )


# Trial successes that close a replica's half-open breaker: with the trials doubling
# (1, 2, 4, ...), the fourth success comes with the replica taking most of its traffic.
SUCCESSES_TO_CLOSE = 4


class AsyncCircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        success_threshold: int = 1,
        rates: RateRule | None = None,
        ignore: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self.name = name
        self._ignore = ignore
        self._rule = rates
        self._window = CallWindow(rates.window_s if rates else 1)
        # The breakers of the replicas that take this one's calls when it is open: rates
        # open it only while one of them is closed and within its own rule (as Envoy's
        # max_ejection_percent: a slow machine makes every replica slow, and opening them
        # all would put every decision on the ladder).
        self.peers: list[AsyncCircuitBreaker] = []
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            success_threshold=success_threshold,
            listeners=[_StateLogger()],
            name=name,
            throw_new_error_on_trip=False,
        )
        self._trials_in_flight = 0
        self._failure_counted_at = float("-inf")  # monotonic

    def rates(self) -> Rates:
        """The rates of the calls made while closed, over the rule's window."""
        return self._window.rates(time.monotonic())

    def _over_rule(self, rates: Rates) -> bool:
        rule = self._rule
        return (
            rule is not None
            and rates.calls >= rule.min_calls
            and (rates.failure_rate >= rule.failure_rate or rates.slow_rate >= rule.slow_rate)
        )

    def _healthy(self) -> bool:
        return self.state == CLOSED and not self._over_rule(self.rates())

    def _judge(self, started: float, *, failed: bool) -> None:
        """Adds a call made while closed to the window; opens the breaker when the rule
        says so and a peer can take its calls."""
        rule = self._rule
        if rule is None or self.state != CLOSED:
            return
        now = time.monotonic()
        self._window.record(now, failed=failed, slow=(now - started) * 1000 >= rule.slow_ms)
        rates = self._window.rates(now)
        if self._over_rule(rates) and (not self.peers or any(p._healthy() for p in self.peers)):
            log.warning(
                "breaker %s: %.0f%% of %d calls in %d s failed, %.0f%% slow (>= %.0f ms)",
                self.name, 100 * rates.failure_rate, rates.calls, rule.window_s,
                100 * rates.slow_rate, rule.slow_ms,
            )  # fmt: skip
            self._window.clear()
            self._breaker.open()

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        state: str = self._breaker.current_state
        return state

    def _reset_elapsed(self) -> bool:
        opened_at: datetime | None = self._breaker._state_storage.opened_at
        timeout = timedelta(seconds=self._breaker.reset_timeout)
        return opened_at is None or datetime.now(UTC) >= opened_at + timeout

    def _rejection(self) -> str | None:
        """Why a call now would be rejected, or None if it would be let through."""
        state = self.state
        if state == CLOSED:
            return None
        if state == OPEN and not self._reset_elapsed():
            return f"{self.name} breaker open"
        allowed = self._trials_allowed()
        if self._trials_in_flight >= allowed:
            return f"{self.name} breaker half-open, {allowed} trial call(s) in flight"
        return None

    def _trials_allowed(self) -> int:
        """Trial calls at once: doubling with each success since the breaker went
        half-open (1 while it is still open: the first trial makes it half-open). So under
        load the replica gets a growing share of the traffic back, rather than one trial
        call at a time whose single unlucky timeout reopens it for another reset timeout."""
        if self.state != HALF_OPEN:
            return 1
        successes: int = self._breaker._state_storage.success_counter
        return 1 << min(successes, MAX_TRIAL_DOUBLINGS)

    def allows_call(self) -> bool:
        """Whether a call now would be let through (no state change)."""
        return self._rejection() is None

    def _admit(self) -> bool:
        """Raises ``BreakerOpenError`` or returns whether this call is the trial call."""
        rejection = self._rejection()
        if rejection is not None:
            raise BreakerOpenError(rejection)
        if self.state == CLOSED:
            return False
        if self.state == OPEN:
            self._breaker.half_open()  # as pybreaker does before its trial call
        self._trials_in_flight += 1
        return True

    def _record(self, *, trial: bool, failure: Exception | None) -> None:
        """Feeds one outcome to pybreaker, if it still concerns the current state.

        A call let in while closed that ends after the breaker opened says nothing the
        breaker does not know; only the trial decides a half-open breaker.
        """
        expected = HALF_OPEN if trial else CLOSED
        if self.state != expected:
            return

        def outcome() -> None:
            if failure is not None:
                raise failure

        # Through pybreaker's call at once: its call_async needs Tornado, and its call holds
        # a thread lock for the guarded call's duration, which must not span an await.
        try:
            self._breaker.call(outcome)
        except Exception as exc:
            if exc is not failure:  # pybreaker re-raises the failure; anything else is a bug
                log.exception("breaker %s failed to record an outcome", self.name)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Awaits ``fn()`` if the breaker admits it and records the outcome.

        Cancellation (the caller giving up) is not recorded as a replica failure.
        """
        trial = self._admit()
        started = time.monotonic()
        try:
            result = await fn()
        except Exception as exc:
            # Calls in flight together fail together when the replica, or the machine,
            # stalls for a moment: one event, not five pieces of evidence. A replica that
            # is down fails call after call, each begun after the last, so each counts; a
            # hung one's refusals (ModelBusy) count too. Any counted failure of a trial
            # reopens the breaker.
            overlapped = overlaps_a_counted_failure(started, self._failure_counted_at)
            if not self._ignore(exc):
                if trial or not overlapped:
                    self._failure_counted_at = time.monotonic()
                    self._record(trial=trial, failure=exc)
                if not trial:  # the window counts each failed call: it judges a share
                    self._judge(started, failed=True)
            raise
        else:
            self._record(trial=trial, failure=None)
            if not trial:
                self._judge(started, failed=False)
            return result
        finally:
            if trial:
                self._trials_in_flight -= 1
