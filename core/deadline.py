"""A request's time budget, how much of it one model call may spend, and waiting for a
call within it without cancelling the call."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import redis.exceptions

log = logging.getLogger(__name__)

T = TypeVar("T")


class Budget:
    """The time a request has, on the monotonic clock, from the caller's gRPC deadline."""

    __slots__ = ("deadline",)

    def __init__(self, total_ms: float, *, started: float | None = None) -> None:
        start = time.monotonic() if started is None else started
        self.deadline = start + total_ms / 1000.0

    def remaining_ms(self) -> float:
        return (self.deadline - time.monotonic()) * 1000.0


# Each model call's cap is cut by a random share up to this, so that many servers' calls
# against one slow replica do not time out in one instant.
TIMEOUT_JITTER = 0.1
# Kept back from the model calls for the ladder (a cached score's read, the rules).
FALLBACK_RESERVE_MS = 3.0
# The defaults of the settings the plan is built from (server.settings.DeadlineSettings).
DEFAULT_BUDGET_MS = 50.0
RESPONSE_MARGIN_MS = 12.0
MODEL_CALL_MS = 25.0
STORE_READ_MS = 10.0


@dataclass(frozen=True, slots=True)
class CallPlan:
    """The one time model of a call: its budget from the caller's deadline, and what each
    step may spend of it. The servicer asks it for the budget and the router for a model
    call's time; the store reads (features, cached scores) are capped by its
    ``store_read_ms``.

    ``default_budget_ms``: a call that carries no deadline. ``response_margin_ms``: the
    plan ends this long before the caller's deadline (the answer's way back).
    ``model_call_ms``: one model call at most, before jitter. ``store_read_ms``: one
    Redis read at most. ``fallback_reserve_ms``: a model call leaves this to the ladder.
    """

    default_budget_ms: float = DEFAULT_BUDGET_MS
    response_margin_ms: float = RESPONSE_MARGIN_MS
    model_call_ms: float = MODEL_CALL_MS
    store_read_ms: float = STORE_READ_MS
    fallback_reserve_ms: float = FALLBACK_RESERVE_MS
    jitter: float = TIMEOUT_JITTER

    def budget(self, time_remaining_s: float | None) -> Budget:
        """The caller's remaining deadline less the response margin, or the default."""
        if time_remaining_s is None:
            return Budget(self.default_budget_ms)
        return Budget(time_remaining_s * 1000.0 - self.response_margin_ms)

    def model_call_timeout_ms(self, budget: Budget, rng: random.Random) -> float:
        """What one model call may spend: the budget less the fallback reserve, capped by
        ``model_call_ms`` lowered by a random share up to ``jitter``."""
        jittered_cap = self.model_call_ms * (1.0 - self.jitter * rng.random())
        return min(budget.remaining_ms() - self.fallback_reserve_ms, jittered_cap)

    @property
    def shortest_model_call_ms(self) -> float:
        """The shortest cap jitter makes."""
        return self.model_call_ms * (1.0 - self.jitter)


# A stalled event loop (its process went unscheduled on a busy machine) may run the timers
# that fell due before it reads the sockets that filled meanwhile (uvloop, which the
# server runs on, does), so a wait that ends this late may be for an answer already
# received. Such a wait gets a moment more, for
# the loop to read it, before it is called a timeout.
STALLED_TIMER_S = 0.002
STALL_GRACE_S = 0.001


class Settles(Protocol):
    """What ``settled_within`` waits for: an asyncio future, or a grpc.aio call itself
    (no task wrapped around it: that wrapper and ``asyncio.wait`` cost on every model
    call)."""

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], None], /) -> None: ...


async def settled_within(future: Settles, timeout_s: float) -> bool:
    """Waits up to ``timeout_s`` for ``future`` (never cancelling it); whether it is done.

    When the wait itself ended more than ``STALLED_TIMER_S`` late (the loop was stalled),
    the future gets ``STALL_GRACE_S`` more: its answer may be waiting in a socket.
    """
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    async def until(when: float) -> None:  # the waiter is done, or ``when`` has come
        timer = loop.call_at(when, wake)
        try:
            await waiter
        finally:
            timer.cancel()

    # A grpc.aio call cannot take a callback back: ``wake`` stays on it, harmless once
    # the waiter is done.
    future.add_done_callback(wake)
    due = loop.time() + timeout_s
    await until(due)
    if not future.done() and loop.time() - due > STALLED_TIMER_S:
        waiter = loop.create_future()
        await until(loop.time() + STALL_GRACE_S)
    return future.done()


class StoreBusy(Exception):
    """Not started: the store still runs ``max_abandoned`` reads nobody waits for."""


@dataclass(frozen=True, slots=True)
class StoreRead(Generic[T]):
    """A read on the decision path: its value, or why there is none."""

    value: T | None
    failure: str = ""  # "" when the store answered


# Decision-path reads left running after their timeout, at most: a hung store holds this
# many, not a backlog.
MAX_ABANDONED_READS = 32


class StoreReads:
    """Reads from one store (Redis) on the decision path, each bounded by the request's
    budget and by ``cap_ms``.

    A read still running at its timeout is abandoned, not cancelled. Cancelling a client
    call mid-flight makes the client clean up first (redis-py closes its connection), and
    a hung server stretches that clean-up past the caller's deadline: a paused Redis made
    answers late that way. At most ``max_abandoned`` reads are left running at once; past
    that no read starts (``StoreBusy``) until some end, so a hung store does not gather a
    backlog that every fresh read waits behind once it wakes. The client's socket timeout
    bounds how long an abandoned read lives.
    """

    def __init__(self, *, cap_ms: float, max_abandoned: int = MAX_ABANDONED_READS) -> None:
        self.cap_ms = cap_ms
        self._max_abandoned = max_abandoned
        self._abandoned: set[asyncio.Future[Any]] = set()

    def timeout_ms(self, budget: Budget) -> float:
        """What the next read may spend: the budget left, capped."""
        return min(budget.remaining_ms(), self.cap_ms)

    @property
    def abandoned(self) -> int:
        """Reads still running after their caller stopped waiting."""
        return len(self._abandoned)

    async def read(
        self, call: Callable[[], Coroutine[Any, Any, T]], budget: Budget, *, what: str
    ) -> StoreRead[T]:
        """``call()`` within the budget left (capped), never raising for the store: a
        timeout, a busy or failed store comes back as ``failure``, in words that begin
        with ``what`` ("feature store timed out after 10.0 ms")."""
        left_ms = self.timeout_ms(budget)
        if left_ms <= 0:
            return StoreRead(None, f"{what} skipped: no budget left")
        try:
            return StoreRead(await self.run(call(), left_ms))
        except TimeoutError:
            return StoreRead(None, f"{what} timed out after {left_ms:.1f} ms")
        except StoreBusy as exc:
            return StoreRead(None, f"{what} busy: {exc}")
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("%s failed: %s", what, exc)
            return StoreRead(None, f"{what} unavailable ({type(exc).__name__})")

    async def run(self, call: Coroutine[Any, Any, T], timeout_ms: float) -> T:
        """Awaits ``call`` for at most ``timeout_ms``, then raises ``TimeoutError`` at once;
        ``StoreBusy`` without starting it when too many reads are still abandoned."""
        if len(self._abandoned) >= self._max_abandoned:
            call.close()
            raise StoreBusy(f"{len(self._abandoned)} abandoned reads still running")
        task = asyncio.ensure_future(call)
        try:
            answered = await settled_within(task, timeout_ms / 1000.0)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if answered:
            return task.result()
        self._abandon(task)
        raise TimeoutError

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an outcome nobody waits for is not an error
