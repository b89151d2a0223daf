"""``cancel_and_wait``: ends background tasks without swallowing the caller's own
cancellation, and without waiting for ever on a task that swallowed its own.

Use it instead of ``task.cancel()`` then ``with suppress(CancelledError): await task``,
which also swallows a cancellation of the caller that arrives while it waits: a timeout
around a ``stop()`` then never fires. Why each step: the comments below. The stops it
serves: docs/architecture.md#start-and-stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Long enough for a task's own cleanup to run after one cancellation, short enough that
# a stop held up by a swallowed one is not noticed. A library may swallow a cancellation
# that lands inside it (redis-py's connection code catches it mid-read and carries on),
# and a loop around such a call then never ends: a task still running after this is
# cancelled again, until it ends (the next cancellation lands at its next await).
RECANCEL_S = 0.5


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancels each task (None: skipped) and waits until every one has ended. Raises the
    first error a task ended with, other than its cancellation."""
    running = [task for task in tasks if task is not None]
    pending = set(running)
    while pending:
        for task in pending:
            task.cancel()
        # asyncio.wait keeps the two apart: the tasks' own CancelledError stays in them,
        # and one of the caller's propagates.
        _done, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in running:
        if not task.cancelled():
            task.result()
