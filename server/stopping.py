"""Starting components in order and stopping them in reverse, each stop within a bound:
one stuck in its stop must not hang the shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


# Beyond its grace and drain, how long one component's stop may take before the
# shutdown goes on without it.
STOP_SLACK_S = 5.0


class Component(Protocol):
    async def start(self) -> None: ...

    def stop(self) -> Awaitable[object]: ...


class Lifecycle:
    """Components started one by one on ``stack``, which stops them in reverse, each stop
    given up after ``stop_s``."""

    def __init__(self, stack: contextlib.AsyncExitStack, stop_s: float) -> None:
        self._stack = stack
        self._stop_s = stop_s

    def on_stop(self, name: str, stop: Callable[[], Awaitable[object]]) -> None:
        self._stack.push_async_callback(bounded(name, stop, self._stop_s))

    async def start(self, name: str, component: Component) -> None:
        await component.start()
        self.on_stop(name, component.stop)


def bounded(
    name: str, stop: Callable[[], Awaitable[object]], timeout_s: float
) -> Callable[[], Awaitable[None]]:
    """``stop``, given up after ``timeout_s`` (cancelled and logged, never awaited
    further): one component stuck in its stop must not hang the whole shutdown, which a
    supervisor or Kubernetes would then end with SIGKILL, journal unsynced."""

    async def run() -> None:
        task = asyncio.ensure_future(stop())
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            where = " <- ".join(awaiting(task.get_coro()))
            task.cancel()
            log.error(
                "%s did not stop within %.0f s (waiting in %s); stopping the rest",
                name,
                timeout_s,
                where,
            )
            return
        task.result()  # its own error, if it failed

    return run


def awaiting(coro: object) -> list[str]:
    """Where a suspended coroutine waits: each awaited coroutine's function and line,
    outermost first (a task's own stack shows only its outermost frame)."""
    places = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            places.append(f"{code.co_qualname} ({Path(code.co_filename).name}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return places
