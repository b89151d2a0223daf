"""On-call's levers through Redis losing its data and announcements being lost, and the
store going back, with a real redis-server of the test's own and a real audit store
(SQLite and PostgreSQL): the store's row is the one copy, so every server keeps obeying
the levers, a change still reaches every server within the poll of the store, each lever
ends at its own expiry, and a store restored from an older backup is written back.

Several ``SharedControl``s on one Redis, key prefix and store stand for several servers
here; ``test_control_state_processes`` does the same with decision server processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from server.audit.store import control_state
from server.control.changes import AuditedChanges
from server.control.shared import DURABLE_POLL_S, SharedControl
from server.control.state import BREAKER_PREFIX, BreakerMode, Change, ControlState, Entry
from tests.server.admin.conftest import OwnRedis
from tests.server.admin.test_control_plane import shared_control

pytestmark = [pytest.mark.integration, pytest.mark.timed]

# How soon every server must obey a change whose announcement was lost: one poll of the
# store, and a margin for a slow machine.
WITHIN_S = DURABLE_POLL_S + 1.0
# Levers that outlast the test, and a short one to watch expire.
LONG_TTL_S = 600.0
SHORT_TTL_S = 3.0


@pytest.fixture
async def fleet(
    own_redis: OwnRedis, key_prefix: str, database_url: str
) -> AsyncIterator[list[SharedControl]]:
    """Servers' control states on the test's Redis and store; more may be appended."""
    servers: list[SharedControl] = []
    try:
        yield servers
    finally:
        for shared in servers:
            await shared.stop()


async def start_server(
    fleet: list[SharedControl], redis: OwnRedis, prefix: str, url: str
) -> SharedControl:
    shared = shared_control(redis.url, prefix, url)
    await shared.start()
    fleet.append(shared)
    return shared


def obeys_all_three(state: ControlState, now_us: int) -> bool:
    killed = state.kill_switch("SOL-USD", now_us)
    return (
        killed is not None
        and killed[0] == "SOL-USD"
        and state.breaker_mode("primary", now_us) is BreakerMode.FORCE_OPEN
        and state.canary(now_us)[0] == pytest.approx(0.25)
    )


def obeys_none(state: ControlState, now_us: int) -> bool:
    return (
        state.kill_switch("SOL-USD", now_us) is None
        and state.breaker_mode("primary", now_us) is BreakerMode.AUTO
        and state.canary(now_us)[0] == 0.0
    )


async def engage_three(shared: SharedControl, ttl_s: float = LONG_TTL_S) -> int:
    """A kill switch on SOL-USD, the primary's breaker forced open and a canary weight,
    each with ``ttl_s`` to live; returns when they expire (µs)."""
    changes = AuditedChanges(shared)
    now_us = time.time_ns() // 1000
    expires_at_us = now_us + int(ttl_s * 1_000_000)
    change = Change("oncall", "test", now_us, expires_at_us)
    for action, field_name, value in (
        ("kill_switch", "kill:SOL-USD", True),
        ("set_breaker", BREAKER_PREFIX + "primary", BreakerMode.FORCE_OPEN.name),
        ("set_canary", "canary", 0.25),
    ):
        await changes.apply(
            actor="oncall",
            action=action,
            target=field_name,
            field_name=field_name,
            entry=Entry(value, change),
            before=lambda _state: {},
            after={"value": value},
            reason="test",
        )
    return expires_at_us


async def obeyed_within(servers: list[SharedControl], within_s: float) -> float:
    """Waits until every server obeys all three; how long it took (fails past
    ``within_s``)."""
    started = time.monotonic()
    while not all(obeys_all_three(s.state, time.time_ns() // 1000) for s in servers):
        assert time.monotonic() - started < within_s, [s.state for s in servers]
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def hold_for(servers: list[SharedControl], seconds: float) -> None:
    """Every server obeys all three on each look for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now_us = time.time_ns() // 1000
        for shared in servers:
            assert obeys_all_three(shared.state, now_us), shared.state
        await asyncio.sleep(0.02)


async def flush(redis: OwnRedis) -> None:
    async with aioredis.Redis.from_url(redis.url) as client:
        await client.flushall()


async def test_levers_hold_through_a_flush_and_an_empty_restart(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    b = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    assert await obeyed_within([b], 0.5) < 0.5  # announced: at once, not by the poll

    await flush(own_redis)
    await hold_for([a, b], 2 * DURABLE_POLL_S)
    await asyncio.to_thread(own_redis.restart_empty)
    await hold_for([a, b], 2 * DURABLE_POLL_S)
    assert a.losses == b.losses == 0  # nothing was lost: Redis held no copy


async def test_a_change_whose_announcement_is_lost_arrives_by_the_poll(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    """Redis stopped: nothing is announced, and the other server reads the change from
    the store within a poll; started again empty, it follows announcements again."""
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    b = await start_server(fleet, own_redis, key_prefix, database_url)
    await asyncio.to_thread(own_redis.proc.stop)
    await engage_three(a)
    await obeyed_within([a, b], WITHIN_S)
    assert not b.status().listening and b.status().listen_error

    await asyncio.to_thread(own_redis.restart_empty)
    deadline = time.monotonic() + 10.0
    while not b.status().listening:
        assert time.monotonic() < deadline, "not subscribed again after Redis returned"
        await asyncio.sleep(0.05)
    await hold_for([a, b], 0.5)


async def test_a_server_started_while_redis_is_down_takes_the_levers_from_the_store(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    await a.stop()
    await asyncio.to_thread(own_redis.proc.stop)

    b = await start_server(fleet, own_redis, key_prefix, database_url)
    assert obeys_all_three(b.state, time.time_ns() // 1000)


async def test_announcements_of_other_writers_change_nothing_a_server_obeys(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    """A server from before the store held the only copy (a rolling upgrade) writes its
    copy to ``{prefix}control:state`` and announces it; anything else may publish on the
    channel. A server reads the store on a newer version and obeys only what it holds."""
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    async with aioredis.Redis.from_url(own_redis.url) as client:
        await client.hset(f"{key_prefix}control:state", mapping={"version": 999, "entries": "{}"})
        for message in ("999", "junk", "-1"):
            await client.publish(a.channel, message)
    await hold_for([a], 0.5)
    assert a.state.version < 999


async def test_levers_still_expire_on_time_without_redis(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    b = await start_server(fleet, own_redis, key_prefix, database_url)
    expires_at_us = await engage_three(a, ttl_s=SHORT_TTL_S)
    await obeyed_within([b], 0.5)
    await asyncio.to_thread(own_redis.proc.stop)
    now_us = time.time_ns() // 1000
    assert now_us < expires_at_us, "the machine was too slow to see the levers before expiry"

    await asyncio.sleep((expires_at_us - time.time_ns() // 1000) / 1e6 + 0.05)
    after_us = time.time_ns() // 1000
    assert all(obeys_none(s.state, after_us) for s in (a, b))


async def test_a_deleted_store_row_is_written_back(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    version = a.state.version
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(control_state.delete())
        await a.refresh()
        assert obeys_all_three(a.state, time.time_ns() // 1000)
        assert a.losses == 1
        with engine.begin() as conn:
            assert conn.execute(sa.select(control_state.c.version)).scalar_one() == version
    finally:
        engine.dispose()


async def test_a_store_restored_from_an_older_backup_is_written_back(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            backup = conn.execute(sa.select(control_state)).one()._asdict()
        await engage_three(a)
        version = a.state.version
        with engine.begin() as conn:
            conn.execute(control_state.update().values(backup))
        await a.refresh()
        assert obeys_all_three(a.state, time.time_ns() // 1000)
        assert a.losses == 1
        last_loss = a.status().last_loss
        assert last_loss is not None and "went back" in last_loss.what
        with engine.begin() as conn:
            assert conn.execute(sa.select(control_state.c.version)).scalar_one() == version
    finally:
        engine.dispose()


async def test_two_fleets_on_one_prefix_with_their_own_stores_keep_their_own_levers(
    own_redis: OwnRedis, key_prefix: str, tmp_path: Path
) -> None:
    """One fleet's announcements make the other read its own store: nothing to fight."""
    servers: list[SharedControl] = []
    try:
        a = await start_server(servers, own_redis, key_prefix, f"sqlite:///{tmp_path / 'a.db'}")
        b = await start_server(servers, own_redis, key_prefix, f"sqlite:///{tmp_path / 'b.db'}")
        await engage_three(a)
        await asyncio.sleep(2 * DURABLE_POLL_S)
        assert obeys_all_three(a.state, time.time_ns() // 1000)
        assert obeys_none(b.state, time.time_ns() // 1000)
        assert a.losses == b.losses == 0
    finally:
        for shared in servers:
            await shared.stop()
