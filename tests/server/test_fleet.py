"""The fleet list in a real Redis: entries expire when not rewritten, a clean stop removes
one at once, and an unreadable entry hides no other."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.control.fleet import (
    FleetMember,
    FleetRegistration,
    fleet_index_key,
    fleet_key,
    fleet_members,
)

pytestmark = pytest.mark.integration


def _member(server_id: str) -> FleetMember:
    return FleetMember(
        server_id=server_id,
        admin_address="127.0.0.1:50052",
        decision_address="127.0.0.1:50051",
        host="h",
        pid=1,
        started_at_us=time.time_ns() // 1000,
        breakers={"primary": "closed"},
    )


async def test_an_entry_not_rewritten_expires_and_a_stopped_one_is_removed(
    redis_client, key_prefix
):
    crashed = FleetRegistration(
        redis_client,
        key_prefix=key_prefix,
        member=lambda: _member("a"),
        interval_s=0.1,
        ttl_s=0.3,
    )
    stopped = FleetRegistration(
        redis_client, key_prefix=key_prefix, member=lambda: _member("b"), interval_s=10.0
    )
    await crashed.start()
    await stopped.start()
    await asyncio.sleep(0.05)
    listed = await fleet_members(redis_client, key_prefix)
    assert [m.server_id for m in listed] == ["a", "b"]
    assert listed[0].breakers == {"primary": "closed"}
    assert listed[0].seen_at_us > 0

    # A crash: its loop ends without removing the key, which expires after its TTL.
    assert crashed._task is not None
    crashed._task.cancel()
    await asyncio.sleep(0.5)
    assert [m.server_id for m in await fleet_members(redis_client, key_prefix)] == ["b"]

    await stopped.stop()  # a clean stop does not wait for its 10 s TTL
    assert await fleet_members(redis_client, key_prefix) == []


async def test_an_unreadable_entry_is_skipped(redis_client, key_prefix):
    now_ms = time.time_ns() // 1_000_000
    await redis_client.zadd(fleet_index_key(key_prefix), {"broken": now_ms, "ok": now_ms})
    await redis_client.set(fleet_key(key_prefix, "broken"), b"{not json")
    await redis_client.set(fleet_key(key_prefix, "ok"), _member("ok").to_json())
    assert [m.server_id for m in await fleet_members(redis_client, key_prefix)] == ["ok"]


async def test_the_list_reads_the_index_and_redis_expiry_decides_who_is_listed(
    redis_client, key_prefix
):
    """No clock but Redis' decides: an id whose entry expired is not listed, whatever its
    score; writers drop from the index only ids ten TTLs older than their own write."""
    now_ms = time.time_ns() // 1_000_000
    index = fleet_index_key(key_prefix)
    # A writer whose clock ran 60 s ahead, and one that stopped writing 11 minutes ago.
    await redis_client.zadd(index, {"ahead": now_ms + 60_000, "gone": now_ms - 660_000})
    await redis_client.set(fleet_key(key_prefix, "ahead"), _member("ahead").to_json())
    writer = FleetRegistration(
        redis_client, key_prefix=key_prefix, member=lambda: _member("me"), ttl_s=10.0
    )
    await writer.refresh()
    listed = [m.server_id for m in await fleet_members(redis_client, key_prefix)]
    assert listed == ["ahead", "me"]  # "gone" has no entry: not listed
    assert sorted(await redis_client.zrange(index, 0, -1)) == [b"ahead", b"me"]  # trimmed
