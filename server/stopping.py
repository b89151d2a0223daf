"""Stopping components within a bound: one stuck in its stop must not hang the shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)


# Beyond its grace and drain, how long one component's stop may take before the
# shutdown goes on without it.
STOP_SLACK_S = 5.0


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
