"""An asyncio circuit breaker driven by pybreaker's state machine.

The awaited call runs outside pybreaker, whose lock must not span an ``await``; its
outcome is fed back through ``CircuitBreaker.call`` with a function that returns or
raises at once, so pybreaker makes every state change. Failures that overlap count once
(calls that fail together in one stall are one event). Half-open, it lets 1, 2, 4, ...
trial calls through as they succeed, until ``success_threshold`` successes close it.
Errors for which ``ignore`` returns True are neither failure nor success. Why:
docs/architecture.md#deadlines-and-load-on-the-decide-path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pybreaker

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
# Trial calls at once double with each success, up to 2**this.
MAX_TRIAL_DOUBLINGS = 6


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
        ignore: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self.name = name
        self._ignore = ignore
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
            overlapped = started < self._failure_counted_at
            if not self._ignore(exc) and (trial or not overlapped):
                self._failure_counted_at = time.monotonic()
                self._record(trial=trial, failure=exc)
            raise
        else:
            self._record(trial=trial, failure=None)
            return result
        finally:
            if trial:
                self._trials_in_flight -= 1
