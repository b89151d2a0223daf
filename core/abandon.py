"""Waiting for work without cancelling it, and the work a caller stopped waiting for.

Cancelling a call mid-flight is not free for what is behind it: TorchServe restarts the
worker that was answering a cancelled gRPC call, and redis-py closes its connection
first, which a hung server stretches past the caller's deadline. So a wait that ends
(its time is up, or its caller is cancelled) abandons the work: it finishes on its own,
unobserved. An ``AbandonPool`` bounds how much is abandoned at once, so that a hung
dependency never gathers a pile: past the bound no new work starts until some ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

from core.deadline import stall_grace_s


class Settles(Protocol):
    """What ``settled_within`` waits for: an asyncio future, or a grpc.aio call itself
    (no task wrapped around it: that wrapper and ``asyncio.wait`` cost on every model
    call)."""

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], None], /) -> None: ...


class Work(Settles, Protocol):
    """What an ``AbandonPool`` waits for: it can also be awaited, to see it end."""

    def __await__(self) -> Generator[Any, None, Any]: ...


async def settled_within(future: Settles, timeout_s: float) -> bool:
    """Waits up to ``timeout_s`` for ``future`` (never cancelling it); whether it is done.

    When the wait itself ended late because the loop stalled, the future gets a moment
    more (``core.deadline.stall_grace_s``): its answer may be waiting in a socket.
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
    if not future.done() and (grace_s := stall_grace_s(loop.time() - due)):
        waiter = loop.create_future()
        await until(loop.time() + grace_s)
    return future.done()


class AbandonPool:
    """The work abandoned by ``wait`` and still running, at most ``limit`` at once.

    ``on_end`` sees each piece of abandoned work end (a future of it), and each piece
    that ended just as its wait did.
    """

    def __init__(
        self, limit: int, *, on_end: Callable[[asyncio.Future[Any]], None] | None = None
    ) -> None:
        self._limit = limit
        self._on_end = on_end
        self._out: dict[asyncio.Future[Any], float] = {}  # work -> abandoned at (monotonic)
        self._total = 0
        self._refused = 0

    @property
    def outstanding(self) -> int:
        return len(self._out)

    @property
    def total(self) -> int:
        """Work abandoned since start."""
        return self._total

    @property
    def refused(self) -> int:
        """Times ``admits`` turned work away."""
        return self._refused

    @property
    def oldest_at(self) -> float:
        """When the longest-running abandoned work was abandoned (monotonic); inf if none."""
        return min(self._out.values(), default=float("inf"))

    def admits(self) -> bool:
        """Whether new work may start now; a refusal is counted in ``refused``."""
        if len(self._out) < self._limit:
            return True
        self._refused += 1
        return False

    async def wait(self, work: Work, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` for ``work`` (``settled_within``); whether it is done.
        Work not done by then, or whose waiter is cancelled, is abandoned."""
        try:
            done = await settled_within(work, timeout_s)
        except asyncio.CancelledError:
            self._abandon(work)
            raise
        if not done:
            self._abandon(work)
        return done

    async def drain(self, timeout_s: float) -> None:
        """Gives the abandoned work up to ``timeout_s`` to end."""
        if self._out:
            await asyncio.wait(set(self._out), timeout=timeout_s)

    def _abandon(self, work: Work) -> None:
        # A future for the work (a task awaiting it, unless it is one), for its end to be
        # seen; made only for work given up on.
        ended = asyncio.ensure_future(work)
        if work.done():
            ended.add_done_callback(self._ended)
            return
        # The time of abandonment, not of starting: what the dependency did meanwhile
        # for work that was still awaited says nothing of it since.
        self._out[ended] = time.monotonic()
        self._total += 1
        ended.add_done_callback(self._ended)

    def _ended(self, ended: asyncio.Future[Any]) -> None:
        self._out.pop(ended, None)
        if not ended.cancelled():
            ended.exception()  # retrieved: an outcome nobody waits for is not an error
        if self._on_end is not None:
            self._on_end(ended)
