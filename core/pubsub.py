"""``listen``: a Redis pub/sub subscription kept up for as long as the task runs.

Pub/sub delivers at most once: what is published while a subscription is down is lost.
So every subscriber here reads the state it follows once the subscription is up
(``on_subscribed``) and then applies messages (``on_message``); when the connection
fails it is told (``on_lost``) and the cycle starts again after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from core.backoff import Backoff

log = logging.getLogger(__name__)

POLL_S = 1.0
RECONNECT_INITIAL_S = 0.05
RECONNECT_MAX_S = 2.0


async def listen(
    subscriber: aioredis.Redis,
    channel: str,
    *,
    on_subscribed: Callable[[], Awaitable[None]],
    on_message: Callable[[bytes], Awaitable[None]],
    on_lost: Callable[[BaseException], None],
) -> None:
    """Runs until cancelled. ``subscriber`` should have no read timeout (a subscription
    waits for messages indefinitely) and a health-check interval."""
    backoff = Backoff(initial_s=RECONNECT_INITIAL_S, max_s=RECONNECT_MAX_S)
    while True:
        try:
            async with subscriber.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                await on_subscribed()
                backoff.reset()
                while True:
                    _stop_if_cancelled()
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=POLL_S
                    )
                    if message is not None and message.get("type") == "message":
                        await on_message(message["data"])
        except (aioredis.RedisError, OSError) as exc:
            on_lost(exc)
            await asyncio.sleep(backoff.next_s())
        except Exception as exc:  # the subscription must outlive any surprise
            log.exception("listener on %s failed; subscribing again", channel)
            on_lost(exc)
            await asyncio.sleep(RECONNECT_MAX_S)


def _stop_if_cancelled() -> None:
    """Ends the listener when its task was cancelled but the CancelledError never came
    out of the Redis calls: a ``SharedControl`` stopped right after a change was
    published went on polling for ever, its task's ``cancelling()`` at 1 (where it was
    lost is not known). That count still says the task was asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
