"""The server's Redis clients: the Decide path's, and small ones for status and the fleet
entry, so that neither ever takes a connection a Decide is waiting for."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.deadline import SOCKET_TIMEOUT_S
from server.settings import Settings

# A side client's connections: enough for one status call, or one fleet write, at a time.
SIDE_REDIS_CONNECTIONS = 2
# The Decide path's pool: more connections than calls a server holds at once.
DECISION_REDIS_CONNECTIONS = 64


def decision_redis(settings: Settings) -> aioredis.Redis:
    """The Decide path's Redis client.

    A full pool makes a caller wait for a connection, for as long as its own budget
    allows (every read runs under the request's timeout), instead of failing at once,
    which would turn a burst into ABSTAINs. A read abandoned at its timeout waits at most
    the socket timeout for a connection, then as long again for Redis.
    """
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            settings.redis.url,
            max_connections=DECISION_REDIS_CONNECTIONS,
            timeout=SOCKET_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            # A request's budget bounds every read; retrying inside it hides an outage.
            retry=Retry(NoBackoff(), 0),
        )
    )


def side_redis(settings: Settings) -> aioredis.Redis:
    """A small client of its own (GetStatus scans every feature key; the fleet entry is
    written every second), so that neither takes a connection a Decide is waiting for."""
    return aioredis.Redis.from_url(
        settings.redis.url,
        max_connections=SIDE_REDIS_CONNECTIONS,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
    )
