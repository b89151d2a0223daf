"""When a server may say SERVING: once Redis answers and the control state is read from
its durable copy and Redis. Without them every answer would be a fallback, or ignore a
kill switch.

Replica connections are opened first, so the first decisions do not pay for the TCP and
HTTP/2 handshakes; a replica that refuses the connection does not delay readiness, one
that does not answer at all by at most ``REPLICA_CONNECT_TIMEOUT_S`` (the breaker and
the ladder deal with either).

``follow_sidecar`` then keeps DecisionService's health (the readiness probe's, not the
server's: liveness must not restart the server for its sidecar) NOT_SERVING while a primary
that is the pod's own sidecar refuses connections (``torchserve.primary_is_sidecar``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis

from core.backoff import Backoff
from server.control.shared import SharedControl
from server.model_client import ModelClient
from server.replica import Replica

log = logging.getLogger(__name__)

REPLICA_CONNECT_TIMEOUT_S = 2.0
# A sidecar gone this long leaves the Service: longer than gRPC's first reconnect attempts,
# so one refused connection (a restart of the replica's frontend) does not.
SIDECAR_GONE_AFTER_S = 3.0
SIDECAR_CHECK_S = 0.5  # how often the primary's connection is looked at


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


async def until_sidecar(primary: ModelClient) -> None:
    """Returns once the primary (the pod's own sidecar) accepts a connection: a pod is not
    ready before its sidecar, as Kubernetes starts a native sidecar first."""
    backoff = Backoff(initial_s=0.05, max_s=1.0)
    while not await primary.connect(REPLICA_CONNECT_TIMEOUT_S):
        log.warning("waiting for the primary, this pod's sidecar")
        await asyncio.sleep(backoff.next_s())


async def follow_sidecar(
    primary: ModelClient,
    set_serving: Callable[[bool], Awaitable[None]],
    gone_after_s: float = SIDECAR_GONE_AFTER_S,
    check_s: float = SIDECAR_CHECK_S,
) -> None:
    """From readiness on: ``set_serving(False)`` once the primary has refused connections
    for ``gone_after_s``, ``set_serving(True)`` once it connects again. Runs until
    cancelled."""
    loop = asyncio.get_running_loop()
    serving, gone_since = True, None
    while True:
        try:
            reachable = await primary.connect(check_s)
        except Exception:  # readiness must keep following: log it, look again
            log.exception("looking at the primary's connection failed")
            reachable = False
        now = loop.time()
        if reachable:
            gone_since = None
        elif gone_since is None:
            gone_since = now
        wanted = gone_since is None or now - gone_since < gone_after_s
        if wanted != serving:
            serving = wanted
            if serving:
                log.warning("the primary (this pod's sidecar) connects again: SERVING")
            else:
                log.error(
                    "the primary (this pod's sidecar) has refused connections for %.0f s: "
                    "NOT_SERVING (DecisionService) until it is back",
                    now - gone_since if gone_since is not None else 0.0,
                )
            await set_serving(serving)
        await asyncio.sleep(check_s)
