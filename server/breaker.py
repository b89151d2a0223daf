"""An asyncio circuit breaker driven by pybreaker's state machine.

pybreaker's ``call_async`` needs Tornado, and its ``call`` holds a thread lock for the
duration of the guarded call, which must not span an ``await``. So the awaited call
runs outside pybreaker, and its outcome is fed back through ``CircuitBreaker.call``
with a function that returns or raises at once: pybreaker does every state change
(closed → open after ``fail_max`` failures, open → half-open after ``reset_timeout``,
half-open → closed on success) under its own lock, and the lock is never held across
an await.

While open or half-open, one trial call at a time is let through; the others are
rejected at once with ``BreakerOpenError``. Errors for which ``ignore`` returns True
(the caller's fault, not the replica's) are recorded as neither failure nor success.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import pybreaker

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN


class BreakerOpenError(Exception):
    """The breaker rejected the call without making it."""


class _StateLogger(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
        log.warning(
            "breaker %s: %s -> %s", cb.name, old.name if old else None, new.name if new else None
        )


def _returns_none() -> None:
    return None


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
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        state: str = self._breaker.current_state
        return state

    @property
    def fail_counter(self) -> int:
        count: int = self._breaker.fail_counter
        return count

    def _reset_elapsed(self) -> bool:
        opened_at: datetime | None = self._breaker._state_storage.opened_at
        timeout = timedelta(seconds=self._breaker.reset_timeout)
        return opened_at is None or datetime.now(UTC) >= opened_at + timeout

    def _admit(self) -> bool:
        """Raises ``BreakerOpenError`` or returns whether this call is the trial call."""
        state = self.state
        if state == CLOSED:
            return False
        if state == OPEN and not self._reset_elapsed():
            raise BreakerOpenError(f"{self.name} breaker open")
        if self._trial_in_flight:
            raise BreakerOpenError(f"{self.name} breaker {state}, trial call in flight")
        self._trial_in_flight = True
        return True

    def allows_call(self) -> bool:
        """Whether a call now would be let through (no state change)."""
        state = self.state
        if state == CLOSED:
            return True
        return not self._trial_in_flight and (state == HALF_OPEN or self._reset_elapsed())

    def _record(self, outcome: Callable[[], None]) -> None:
        try:
            self._breaker.call(outcome)
        except pybreaker.CircuitBreakerError:
            pass  # opened meanwhile by a concurrent failure: nothing more to record
        except Exception:  # noqa: BLE001, S110 - the failure being recorded, re-raised by pybreaker
            pass

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Awaits ``fn()`` if the breaker admits it and records the outcome.

        Cancellation (the caller giving up) is not recorded as a replica failure.
        """
        trial = self._admit()
        try:
            result = await fn()
        except Exception as exc:
            if not self._ignore(exc):
                failure = exc

                def _raise() -> NoReturn:
                    raise failure

                self._record(_raise)
            raise
        else:
            self._record(_returns_none)
            return result
        finally:
            if trial:
                self._trial_in_flight = False

    def force_open(self) -> None:
        self._breaker.open()

    def force_closed(self) -> None:
        self._breaker.close()
