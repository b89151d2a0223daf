"""A request's time budget, how much of it one model call may spend, and waiting for a
call within it without cancelling the call."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Calls left to finish after their callers stopped waiting: held here so that nothing
# collects them before they end (the event loop keeps only weak references to tasks).
_abandoned: set[asyncio.Future[Any]] = set()


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


async def within(call: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """Awaits ``call`` for at most ``timeout_s``, then raises ``TimeoutError`` at once.

    The call is abandoned, not cancelled: it finishes in the background and its outcome
    is dropped. Cancelling a client call mid-flight makes the client clean up first
    (redis-py closes its connection), and a hung server stretches that clean-up past the
    caller's deadline: a paused Redis made answers late that way. The client's own socket
    timeout bounds how long an abandoned call lives.
    """
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(timeout_s, 0.0))
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if task in done:
        return task.result()
    _abandon(task)
    raise TimeoutError


def _abandon(task: asyncio.Future[Any]) -> None:
    _abandoned.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Future[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: an outcome nobody waits for is not an error
