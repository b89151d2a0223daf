"""On-call's levers survive a copy losing data (Redis flushed, restarted empty, gone
back, written by hand; the store restored from an older backup) with a real redis-server
of the test's own and a real audit store (SQLite and PostgreSQL): every server keeps
obeying them, the copy gets them back, the loss is counted, a server started while Redis
is empty takes them from the store, and each lever still ends at its own expiry.

Several ``SharedControl``s on one Redis, key prefix and store stand for several servers
here; ``test_control_state_processes`` does the same with decision server processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from server.audit.store import control_state
from server.control.changes import AuditedChanges
from server.control.redis_copy import RedisCopy
from server.control.shared import SharedControl
from server.control.state import BREAKER_PREFIX, BreakerMode, Change, ControlState, Entry
from tests.server.admin.conftest import OwnRedis
from tests.server.admin.test_control_plane import shared_control

pytestmark = pytest.mark.integration

# How soon after a loss every server must be seen obeying, and Redis hold the state again.
WITHIN_S = 1.0
# Levers that outlast the test, and a short one to watch expire after a loss.
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


async def watch_obeying(servers: list[SharedControl], redis_url: str, key: str) -> None:
    """Every server obeys all three throughout, and within ``WITHIN_S`` Redis holds the
    state again at the servers' version."""
    deadline = time.monotonic() + WITHIN_S
    async with aioredis.Redis.from_url(redis_url) as client:
        while True:
            now_us = time.time_ns() // 1000
            for shared in servers:
                assert obeys_all_three(shared.state, now_us), shared.state
            version = await client.hget(key, "version")
            if version is not None and all(int(version) == s.state.version for s in servers):
                return
            assert time.monotonic() < deadline, f"Redis not repaired: version {version!r}"
            await asyncio.sleep(0.02)


def redis_losses(*servers: SharedControl) -> int:
    return sum(s.losses["redis"] for s in servers)


async def flush(redis: OwnRedis) -> None:
    async with aioredis.Redis.from_url(redis.url) as client:
        await client.flushall()


async def test_levers_hold_through_a_flush_and_an_empty_restart(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    b = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    await b.refresh()
    assert obeys_all_three(b.state, time.time_ns() // 1000)
    assert redis_losses(a, b) == 0  # changes, even the fleet's first, are not losses
    key = f"{key_prefix}control:state"

    await flush(own_redis)
    await watch_obeying([a, b], own_redis.url, key)
    after_flush = redis_losses(a, b)
    assert after_flush >= 1  # the first server to look counts it; the other may

    await asyncio.to_thread(own_redis.restart_empty)
    await watch_obeying([a, b], own_redis.url, key)
    assert redis_losses(a, b) > after_flush
    last_loss = a.status().last_loss or b.status().last_loss
    assert last_loss is not None and "no control state" in last_loss.what
    assert all(s.losses["durable"] == 0 for s in (a, b))


async def test_a_server_started_while_redis_is_empty_takes_the_levers_from_the_store(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    """A fleet restart beside a Redis that lost everything: no server is left to write
    Redis back, so only the store can tell the new one."""
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    await a.stop()
    await flush(own_redis)

    b = await start_server(fleet, own_redis, key_prefix, database_url)
    assert obeys_all_three(b.state, time.time_ns() // 1000)
    assert b.losses["redis"] == 1  # it found Redis empty, and wrote it back
    await watch_obeying([b], own_redis.url, f"{key_prefix}control:state")


async def test_levers_still_expire_on_time_after_a_loss(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    b = await start_server(fleet, own_redis, key_prefix, database_url)
    expires_at_us = await engage_three(a, ttl_s=SHORT_TTL_S)
    await flush(own_redis)
    await asyncio.sleep(0.3)  # each server has read Redis at least once since
    now_us = time.time_ns() // 1000
    assert now_us < expires_at_us, "the machine was too slow to see the levers before expiry"
    assert all(obeys_all_three(s.state, now_us) for s in (a, b))

    await asyncio.sleep((expires_at_us - time.time_ns() // 1000) / 1e6 + 0.05)
    after_us = time.time_ns() // 1000
    assert all(obeys_none(s.state, after_us) for s in (a, b))


async def test_a_redis_copy_that_went_back_a_version_is_not_obeyed(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    """A failover to a replica that missed the last writes: an older state in Redis."""
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    found = await repaired_by_hand_edit(
        a,
        own_redis,
        key_prefix,
        lambda client, key: client.hset(key, mapping={"version": 1, "entries": "{}"}),
    )
    assert a.losses["redis"] == 1 and "went back" in found


async def test_a_redis_version_the_store_does_not_have_is_not_obeyed(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    """A write by hand (or by anything but AdminService): never an audited change."""
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    found = await repaired_by_hand_edit(
        a,
        own_redis,
        key_prefix,
        lambda client, key: client.hset(key, mapping={"version": 999, "entries": "{}"}),
    )
    assert "which the audit store does not" in found


async def repaired_by_hand_edit(
    a: SharedControl,
    redis: OwnRedis,
    key_prefix: str,
    edit: Callable[[aioredis.Redis, str], Awaitable[object]],
) -> str:
    """Edits Redis's copy by hand, then waits (bounded) until ``a`` counted the loss and
    Redis holds its state again, entries and all; returns what ``a`` found."""
    key = f"{key_prefix}control:state"
    reader = RedisCopy(redis.url, key_prefix=key_prefix, timeout_ms=500)
    try:
        async with aioredis.Redis.from_url(redis.url) as client:
            await edit(client, key)
        deadline = time.monotonic() + 10.0
        while True:
            assert obeys_all_three(a.state, time.time_ns() // 1000)
            copy = await reader.read()
            loss = a.status().last_loss
            if (
                loss is not None
                and copy.version == a.state.version
                and copy.entries == a.state.entries
            ):
                return loss.what
            assert time.monotonic() < deadline, f"not repaired: {copy}"
            await asyncio.sleep(0.05)
    finally:
        await reader.aclose()


async def test_entries_gone_without_a_new_version_are_not_obeyed(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    # Same version, nothing set: the version check does not see it, the poll's full read does.
    found = await repaired_by_hand_edit(
        a, own_redis, key_prefix, lambda client, key: client.hset(key, "entries", "{}")
    )
    assert "changed without a change" in found


@pytest.mark.parametrize(
    ("edit", "found"),
    [
        (lambda client, key: client.set(key, "7"), "the key is a string, not a hash"),
        (lambda client, key: client.hset(key, "version", "03"), "not as this code writes it"),
    ],
)
async def test_a_redis_copy_written_otherwise_is_replaced(
    fleet, own_redis: OwnRedis, key_prefix: str, database_url: str, edit, found: str
) -> None:
    a = await start_server(fleet, own_redis, key_prefix, database_url)
    await engage_three(a)
    assert found in await repaired_by_hand_edit(a, own_redis, key_prefix, edit)


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
        assert a.losses["durable"] == 1
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
        assert a.losses["durable"] == 1
        with engine.begin() as conn:
            assert conn.execute(sa.select(control_state.c.version)).scalar_one() == version
    finally:
        engine.dispose()


async def test_two_fleets_on_one_prefix_with_their_own_stores_do_not_fight_hot(
    own_redis: OwnRedis, key_prefix: str, tmp_path: Path
) -> None:
    """Each finds the other's version a loss, and writes its own back at most once per
    resync interval (0.25 s here), not as fast as its loop runs; each keeps obeying its
    own store."""
    servers: list[SharedControl] = []
    try:
        a = await start_server(servers, own_redis, key_prefix, f"sqlite:///{tmp_path / 'a.db'}")
        b = await start_server(servers, own_redis, key_prefix, f"sqlite:///{tmp_path / 'b.db'}")
        fighting_since = time.monotonic()  # from a's first change
        await engage_three(a)
        await asyncio.sleep(2.0)
        assert obeys_all_three(a.state, time.time_ns() // 1000)
        assert obeys_none(b.state, time.time_ns() // 1000)
        # One a resync interval (0.25 s) for each version a server held, three for a.
        most = (time.monotonic() - fighting_since) / 0.25 + 3
        assert 0 < redis_losses(a) <= most, a.losses
        assert 0 < redis_losses(b) <= most, b.losses
    finally:
        for shared in servers:
            await shared.stop()
