"""Reads from a store on the decision path, each within the call's budget and a cap."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.exceptions

from core.abandon import AbandonPool
from core.deadline import MAX_ABANDONED_READS, Budget, store_read_timeout_ms

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoreBusy(Exception):
    """Not started: the store still runs ``max_abandoned`` reads nobody waits for."""


@dataclass(frozen=True, slots=True)
class StoreRead(Generic[T]):
    """A read on the decision path: its value, or why there is none."""

    value: T | None
    failure: str = ""  # "" when the store answered


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
        return store_read_timeout_ms(budget, self.cap_ms)

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
