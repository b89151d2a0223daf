"""A request's time budget, how much of it one model call may spend, and the reads from a
store on the decision path within it."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.exceptions

from core.abandon import AbandonPool

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

    A read still running at its timeout is abandoned, not cancelled (``core.abandon``):
    at most ``max_abandoned`` at once; past that no read starts (``StoreBusy``) until some
    end, so a hung store does not gather a backlog that every fresh read waits behind once
    it wakes. The client's socket timeout bounds how long an abandoned read lives.
    """

    def __init__(self, *, cap_ms: float, max_abandoned: int = MAX_ABANDONED_READS) -> None:
        self.cap_ms = cap_ms
        self._abandoned = AbandonPool(max_abandoned)

    def timeout_ms(self, budget: Budget) -> float:
        """What the next read may spend: the budget left, capped."""
        return min(budget.remaining_ms(), self.cap_ms)

    @property
    def abandoned(self) -> int:
        """Reads still running after their caller stopped waiting."""
        return self._abandoned.outstanding

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
        if not self._abandoned.admits():
            call.close()
            raise StoreBusy(f"{self._abandoned.outstanding} abandoned reads still running")
        task = asyncio.ensure_future(call)
        if await self._abandoned.wait(task, timeout_ms / 1000.0):
            return task.result()
        raise TimeoutError
