"""When a server may say SERVING: once Redis answers and the control state is read from
its durable copy and Redis. Without them every answer would be a fallback, or ignore a
kill switch.

Replica connections are opened first, so the first decisions do not pay for the TCP and
HTTP/2 handshakes; a replica that refuses the connection does not delay readiness, one
that does not answer at all by at most ``REPLICA_CONNECT_TIMEOUT_S`` (the breaker and
the ladder deal with either).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis

from core.backoff import Backoff
from server.control.shared import SharedControl
from server.replica import Replica

log = logging.getLogger(__name__)

REPLICA_CONNECT_TIMEOUT_S = 2.0


async def until_ready(
    replicas: Sequence[Replica], redis: aioredis.Redis, shared: SharedControl, redis_url: str
) -> None:
    """Returns once the server may serve; retries Redis and the audit store until then."""
    connected = await asyncio.gather(
        *(r.client.connect(REPLICA_CONNECT_TIMEOUT_S) for r in replicas)
    )
    for replica, ok in zip(replicas, connected, strict=True):
        if not ok:
            log.warning("replica %s not reachable at start", replica.name)
    backoff = Backoff(initial_s=0.05, max_s=2.0)
    while True:
        try:
            await redis.ping()
            # Never decide before the kill switches and overrides are known.
            if not shared.known:
                await shared.refresh()
            if shared.known:
                return
            log.warning(
                "waiting for the control state in the audit store: %s",
                shared.status().durable_error,
            )
        except (aioredis.RedisError, OSError) as exc:
            log.warning("waiting for Redis at %s: %s", redis_url, exc)
        await asyncio.sleep(backoff.next_s())
