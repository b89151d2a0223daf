"""``cancel_and_wait``: ends background tasks without swallowing the caller's own
cancellation.

The usual ``task.cancel()`` then ``with suppress(CancelledError): await task`` also
swallows a cancellation of the caller that arrives while it waits (a timeout around a
``stop()``, a shutdown giving up on a component): the caller goes on as if it had not
been cancelled, and the timeout never fires. ``asyncio.wait`` keeps the two apart: the
tasks' own CancelledError stays in them, and one of the caller's propagates.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancels each task (None: skipped) and waits until every one has ended. Raises the
    first error a task ended with, other than its cancellation."""
    running = [task for task in tasks if task is not None]
    if not running:
        return
    for task in running:
        task.cancel()
    await asyncio.wait(running)
    for task in running:
        if not task.cancelled():
            task.result()
