"""The fleet: every running server process registers itself in the shared Redis, with a TTL.

Each server (each worker of ``--workers N``: each has its own breakers) writes one key,
``<prefix>fleet:<server_id>``, every ``interval_s`` (1 s) with what on-call wants to see
of it at a glance and its counts, with a TTL (10 s), and its id in the index
``<prefix>fleet`` (a sorted set by write time; listing reads it, not a SCAN of a keyspace
holding every symbol's features): a server that dies or loses Redis drops out of the list
within the TTL with no one cleaning up; one that stops cleanly removes itself at once.
``decisionctl status`` and ``decisionctl top`` read the list through any one server
(``AdminService.ListServers``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import orjson
import redis.asyncio as aioredis

from core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

FLEET_KEY = "fleet:"
# Every second: decisionctl top's rates come from these counts. An entry lives 10 s
# unrewritten, so a server busy for a few seconds does not blink out of the list.
DEFAULT_INTERVAL_S = 1.0
DEFAULT_TTL_S = 10.0
# An index member outlives its entry this many TTLs before a writer removes it.
INDEX_KEEP_TTLS = 10
# More than any fleet: a prefix shared by mistake cannot make a status read unbounded.
MAX_MEMBERS = 1000


@dataclass(frozen=True, slots=True)
class FleetMember:
    """One server process as it last said of itself."""

    server_id: str
    admin_address: str  # where decisionctl reaches it (host:port)
    decision_address: str
    host: str
    pid: int
    started_at_us: int
    seen_at_us: int = 0  # when it last wrote this (its own wall clock)
    serving: bool = False
    in_flight: int = 0
    decisions: int = 0  # answered since it started
    breakers: Mapping[str, str] = field(default_factory=dict)  # replica -> state
    decisions_by_source: Mapping[str, int] = field(default_factory=dict)  # "primary" -> n
    fallbacks: Mapping[str, int] = field(default_factory=dict)  # reason code -> n
    shadow_scored: int = 0  # decisions the challenger scored in the shadow
    shadow_agreed: int = 0  # of them, those it decided the same way
    # Answer times by source: observations per bucket of LATENCY_BOUNDS_S (the last
    # above every bound), since the server started.
    latency_counts: Mapping[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> FleetMember:
        data = orjson.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def reachable(host: str, port: int, hostname: str) -> str:
    """``host:port`` as another machine would dial it: a wildcard host is this host's name."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = hostname
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fleet_key(key_prefix: str, server_id: str) -> str:
    return f"{key_prefix}{FLEET_KEY}{server_id}"


def fleet_index_key(key_prefix: str) -> str:
    """The sorted set of server ids by their last write (ms): listing reads it, not a
    SCAN of a keyspace that holds every symbol's features."""
    return f"{key_prefix}fleet"


async def fleet_members(client: aioredis.Redis, key_prefix: str) -> list[FleetMember]:
    """Every server whose entry has not expired, by server id. Expiry is Redis' own (the
    entry's TTL), so no reader's or writer's clock decides who is listed. An entry that
    does not parse is skipped (logged): one bad writer must not hide the others. Raises
    Redis' errors."""
    ids = await client.zrange(fleet_index_key(key_prefix), 0, MAX_MEMBERS - 1, desc=True)
    if not ids:
        return []
    keys = [fleet_key(key_prefix, i.decode() if isinstance(i, bytes) else str(i)) for i in ids]
    members = []
    for key, raw in zip(keys, await client.mget(keys), strict=True):
        if raw is None:  # expired: a server that stopped writing
            continue
        try:
            members.append(FleetMember.from_json(raw))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("fleet entry %r unreadable: %s", key, exc)
    return sorted(members, key=lambda m: m.server_id)


class FleetRegistration:
    """Keeps this server's fleet entry fresh while it runs; removes it on ``stop``."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        member: Callable[[], FleetMember],
        interval_s: float = DEFAULT_INTERVAL_S,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        """``member``: this server as it is now (called at each refresh)."""
        self._client = client
        self._key_prefix = key_prefix
        self._member = member
        self._interval_s = interval_s
        self._ttl_ms = int(max(ttl_s, 2 * interval_s) * 1000)
        self._task: asyncio.Task[None] | None = None
        self._registered_id = ""

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keep_fresh(), name="fleet registration")

    async def refresh(self) -> None:
        """Writes the entry once; raises Redis' errors."""
        member = self._member()
        stamped = FleetMember(**{**asdict(member), "seen_at_us": time.time_ns() // 1000})
        now_ms = stamped.seen_at_us // 1000
        index = fleet_index_key(self._key_prefix)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(
                fleet_key(self._key_prefix, member.server_id), stamped.to_json(), px=self._ttl_ms
            )
            pipe.zadd(index, {member.server_id: now_ms})
            # Servers gone for good leave the index here, long after their entry expired:
            # the margin is for clocks that disagree (the listing does not read scores).
            pipe.zremrangebyscore(index, "-inf", now_ms - INDEX_KEEP_TTLS * self._ttl_ms)
            pipe.pexpire(index, INDEX_KEEP_TTLS * self._ttl_ms)  # the index outlives no fleet
            await pipe.execute()
        self._registered_id = member.server_id

    async def _keep_fresh(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                if failing:
                    log.info("fleet registration written again")
                failing = False
            except Exception as exc:  # noqa: BLE001 - Redis' or our own: logged, tried again
                if not failing:  # once per outage, not every interval
                    log.warning("fleet registration not written: %r", exc)
                failing = True
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._registered_id:
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.delete(fleet_key(self._key_prefix, self._registered_id))
                    pipe.zrem(fleet_index_key(self._key_prefix), self._registered_id)
                    await pipe.execute()
            except (aioredis.RedisError, OSError) as exc:
                log.info("fleet entry left to expire: %s", exc)
