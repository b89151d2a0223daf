"""The group coordinator on its own: generations, leader, assignments, errors, expiry."""

from __future__ import annotations

import asyncio

import pytest

from localkafka.coordinator import GroupCoordinator
from localkafka.errors import ErrorCode
from localkafka.group import GroupSettings, GroupState, JoinRequest, JoinResult

pytestmark = pytest.mark.timed  # sessions of 100 ms, measured against the wall clock

SETTINGS = GroupSettings(initial_rebalance_delay_ms=20, min_session_timeout_ms=50)


def request(
    member_id: str = "",
    *,
    group: str = "g",
    session_ms: int = 10_000,
    rebalance_ms: int = 5_000,
    protocols: tuple[tuple[str, bytes], ...] = (("range", b"meta"),),
    protocol_type: str = "consumer",
    known: bool = False,
) -> JoinRequest:
    return JoinRequest(
        group_id=group,
        member_id=member_id,
        group_instance_id=None,
        client_id="client",
        client_host="127.0.0.1",
        session_timeout_ms=session_ms,
        rebalance_timeout_ms=rebalance_ms,
        protocol_type=protocol_type,
        protocols=protocols,
        require_known_member_id=known,
    )


async def join_two(coordinator: GroupCoordinator, **options: object) -> tuple[JoinResult, ...]:
    first = asyncio.create_task(coordinator.join(request(protocols=(("range", b"A"),))))
    second = asyncio.create_task(
        coordinator.join(request(protocols=(("range", b"B"),), **options))  # type: ignore[arg-type]
    )
    return tuple(await asyncio.gather(first, second))


async def test_two_members_join_one_generation_and_the_leader_sees_both() -> None:
    coordinator = GroupCoordinator(SETTINGS)
    a, b = await join_two(coordinator)
    assert a.error is b.error is ErrorCode.NONE
    assert a.generation_id == b.generation_id == 1
    assert a.leader_id == b.leader_id == a.member_id  # the first to join leads
    assert sorted(meta for _, _, meta in a.members) == [b"A", b"B"]
    assert b.members == ()

    follower = asyncio.create_task(coordinator.sync("g", 1, b.member_id, {}))
    await asyncio.sleep(0.01)
    assert not follower.done()  # waits for the leader's assignment
    leader = await coordinator.sync("g", 1, a.member_id, {a.member_id: b"1", b.member_id: b"2"})
    assert (leader.error, leader.assignment) == (ErrorCode.NONE, b"1")
    assert (await follower).assignment == b"2"
    group = coordinator.group("g")
    assert group is not None and group.state is GroupState.STABLE
    assert coordinator.heartbeat("g", 1, b.member_id) is ErrorCode.NONE
    coordinator.close()


async def test_stale_members_and_generations_are_refused() -> None:
    coordinator = GroupCoordinator(SETTINGS)
    joined = await coordinator.join(request())
    await coordinator.sync("g", 1, joined.member_id, {joined.member_id: b""})
    assert coordinator.heartbeat("g", 0, joined.member_id) is ErrorCode.ILLEGAL_GENERATION
    assert coordinator.heartbeat("g", 1, "nobody") is ErrorCode.UNKNOWN_MEMBER_ID
    assert coordinator.heartbeat("nogroup", 1, "x") is ErrorCode.UNKNOWN_MEMBER_ID
    assert (await coordinator.join(request("nobody"))).error is ErrorCode.UNKNOWN_MEMBER_ID
    assert (await coordinator.sync("g", 2, joined.member_id, {})).error is (
        ErrorCode.ILLEGAL_GENERATION
    )
    assert coordinator.check_commit("g", 1, joined.member_id) is ErrorCode.NONE
    assert coordinator.check_commit("g", 0, joined.member_id) is ErrorCode.ILLEGAL_GENERATION
    assert coordinator.check_commit("g", -1, "") is ErrorCode.UNKNOWN_MEMBER_ID  # active group
    assert coordinator.check_commit("fresh", -1, "") is ErrorCode.NONE  # outside group management
    assert coordinator.check_commit("", -1, "") is ErrorCode.INVALID_GROUP_ID
    coordinator.close()


async def test_joins_that_cannot_be_accepted() -> None:
    coordinator = GroupCoordinator(SETTINGS)
    assert (await coordinator.join(request(session_ms=10))).error is (
        ErrorCode.INVALID_SESSION_TIMEOUT
    )
    assert (await coordinator.join(request(group=""))).error is ErrorCode.INVALID_GROUP_ID
    await coordinator.join(request())
    other = request(protocols=(("roundrobin", b""),))
    assert (await coordinator.join(other)).error is ErrorCode.INCONSISTENT_GROUP_PROTOCOL
    coordinator.close()


async def test_a_new_member_first_gets_its_id_from_join_group_v4() -> None:
    coordinator = GroupCoordinator(SETTINGS)
    first = await coordinator.join(request(known=True))
    assert first.error is ErrorCode.MEMBER_ID_REQUIRED and first.member_id
    second = await coordinator.join(request(first.member_id, known=True))
    assert (second.error, second.member_id) == (ErrorCode.NONE, first.member_id)
    coordinator.close()


async def test_a_leaving_member_makes_the_others_rebalance() -> None:
    coordinator = GroupCoordinator(SETTINGS)
    a, b = await join_two(coordinator)
    await asyncio.gather(
        coordinator.sync("g", 1, a.member_id, {}), coordinator.sync("g", 1, b.member_id, {})
    )
    assert coordinator.leave("g", a.member_id) is ErrorCode.NONE
    assert coordinator.heartbeat("g", 1, b.member_id) is ErrorCode.REBALANCE_IN_PROGRESS
    rejoined = await coordinator.join(request(b.member_id, protocols=(("range", b"B"),)))
    # The only member left has rejoined: no waiting for the rebalance timeout.
    assert (rejoined.generation_id, rejoined.leader_id) == (2, b.member_id)
    assert coordinator.leave("g", a.member_id) is ErrorCode.UNKNOWN_MEMBER_ID
    coordinator.close()


async def test_a_member_that_stops_heartbeating_is_removed_after_its_session() -> None:
    coordinator = GroupCoordinator(SETTINGS)
    a, b = await join_two(coordinator, session_ms=100)
    await asyncio.gather(
        coordinator.sync("g", 1, a.member_id, {}), coordinator.sync("g", 1, b.member_id, {})
    )
    for _ in range(10):  # a heartbeats, b does not
        await asyncio.sleep(0.03)
        coordinator.heartbeat("g", 1, a.member_id)
        coordinator.expire()
    assert coordinator.heartbeat("g", 1, b.member_id) is ErrorCode.UNKNOWN_MEMBER_ID
    assert coordinator.heartbeat("g", 1, a.member_id) is ErrorCode.REBALANCE_IN_PROGRESS
    coordinator.close()


async def test_a_member_that_does_not_rejoin_is_dropped_at_the_rebalance_timeout() -> None:
    coordinator = GroupCoordinator(SETTINGS)
    a, b = await join_two(coordinator, rebalance_ms=200)
    await asyncio.gather(
        coordinator.sync("g", 1, a.member_id, {}), coordinator.sync("g", 1, b.member_id, {})
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    # a asks for a new generation (new metadata); b keeps heartbeating but never rejoins.
    rejoin = asyncio.create_task(coordinator.join(request(a.member_id, rebalance_ms=200)))
    while not rejoin.done():
        coordinator.heartbeat("g", 1, b.member_id)
        await asyncio.sleep(0.02)
    result = rejoin.result()
    assert 0.15 < loop.time() - started < 1.0
    assert result.generation_id == 2
    assert [m for m, _, _ in result.members] == [a.member_id]
    coordinator.close()
