"""The group coordinator: JoinGroup, SyncGroup, Heartbeat, LeaveGroup and the commit check,
with Kafka's classic-protocol semantics and error codes.

A join starts a rebalance that completes once every known member has rejoined or the
largest rebalance timeout passes; SyncGroup then hands each member its part of the leader's
assignment. ``expire``, called periodically by the broker, removes members whose session
lapsed. Stale members get UNKNOWN_MEMBER_ID, stale generations ILLEGAL_GENERATION. Each
step's rules are on its method; the APIs and versions served: docs/kafka-apis.md.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TypeVar

from localkafka.errors import ErrorCode
from localkafka.group import (
    Group,
    GroupSettings,
    GroupState,
    JoinRequest,
    JoinResult,
    Member,
    SyncResult,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class GroupCoordinator:
    def __init__(self, settings: GroupSettings) -> None:
        self._settings = settings
        self._groups: dict[str, Group] = {}

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def group(self, group_id: str) -> Group | None:
        return self._groups.get(group_id)

    def groups(self) -> list[Group]:
        """Every group that has had a member since the broker started."""
        return list(self._groups.values())

    async def join(self, request: JoinRequest) -> JoinResult:
        """Moves the group to PreparingRebalance and answers once every known member has
        rejoined, or when the largest rebalance timeout passes (members that did not rejoin
        are removed). The leader's answer carries every member's metadata for the chosen
        protocol."""
        settings = self._settings
        if not request.group_id:
            return JoinResult(ErrorCode.INVALID_GROUP_ID, request.member_id)
        if not (
            settings.min_session_timeout_ms
            <= request.session_timeout_ms
            <= settings.max_session_timeout_ms
        ):
            return JoinResult(ErrorCode.INVALID_SESSION_TIMEOUT, request.member_id)
        group = self._groups.get(request.group_id)
        if group is None:
            if request.member_id:
                return JoinResult(ErrorCode.UNKNOWN_MEMBER_ID, request.member_id)
            group = self._groups[request.group_id] = Group(request.group_id)
        if not group.accepts(request):
            return JoinResult(ErrorCode.INCONSISTENT_GROUP_PROTOCOL, request.member_id)
        if not request.member_id:
            member_id = f"{request.client_id}-{uuid.uuid4()}"
            if request.require_known_member_id:
                group.pending[member_id] = self._now() + request.session_timeout_ms / 1000
                return JoinResult(ErrorCode.MEMBER_ID_REQUIRED, member_id)
            return await self._add_member(group, member_id, request)
        if group.pending.pop(request.member_id, None) is not None:
            return await self._add_member(group, request.member_id, request)
        member = group.members.get(request.member_id)
        if member is None:
            return JoinResult(ErrorCode.UNKNOWN_MEMBER_ID, request.member_id)
        unchanged = member.request.protocols == request.protocols
        if group.state is GroupState.COMPLETING_REBALANCE and unchanged:
            return group.join_result(member)
        if group.state is GroupState.STABLE and unchanged and member.member_id != group.leader_id:
            return group.join_result(member)
        member.request = request
        waiter = self._await_join(member)
        if group.state is not GroupState.PREPARING_REBALANCE:
            self._prepare_rebalance(group, f"member {member.member_id} rejoined")
        self._try_complete_join(group)
        return await self._wait(member, waiter)

    async def _add_member(self, group: Group, member_id: str, request: JoinRequest) -> JoinResult:
        member = Member(member_id, request)
        group.members[member_id] = member
        group.protocol_type = request.protocol_type
        if group.leader_id is None:
            group.leader_id = member_id
        group.new_member_added = True
        waiter = self._await_join(member)
        if group.state is not GroupState.PREPARING_REBALANCE:
            self._prepare_rebalance(group, f"new member {member_id}")
        self._try_complete_join(group)
        return await self._wait(member, waiter)

    def _await_join(self, member: Member) -> asyncio.Future[JoinResult]:
        if member.join_waiter is not None and not member.join_waiter.done():
            # A repeated JoinGroup replaces the one still waiting, as in Kafka.
            member.join_waiter.set_result(
                JoinResult(ErrorCode.REBALANCE_IN_PROGRESS, member.member_id)
            )
        member.join_waiter = asyncio.get_running_loop().create_future()
        return member.join_waiter

    @staticmethod
    async def _wait(member: Member, waiter: asyncio.Future[T]) -> T:
        try:
            return await waiter
        except asyncio.CancelledError:
            # The connection went away: the member no longer counts as waiting.
            if member.join_waiter is waiter:
                member.join_waiter = None
            if member.sync_waiter is waiter:
                member.sync_waiter = None
            raise

    def _prepare_rebalance(self, group: Group, reason: str) -> None:
        if group.state is GroupState.COMPLETING_REBALANCE:
            for member in group.members.values():
                member.assignment = b""
                self._resolve_sync(member, SyncResult(ErrorCode.REBALANCE_IN_PROGRESS))
        if group.timer is not None:
            group.timer.cancel()
        loop = asyncio.get_running_loop()
        group.in_initial_delay = group.state is GroupState.EMPTY
        group.state = GroupState.PREPARING_REBALANCE
        group.rebalance_deadline = self._now() + group.rebalance_timeout_s()
        if group.in_initial_delay:
            # A new (Empty) group waits initial_rebalance_delay_ms first, longer while members
            # keep arriving (_initial_delay_over), as Kafka's group.initial.rebalance.delay.ms.
            delay = min(
                self._settings.initial_rebalance_delay_ms / 1000, group.rebalance_timeout_s()
            )
            group.new_member_added = False
            group.timer = loop.call_later(delay, self._initial_delay_over, group)
        else:
            group.timer = loop.call_later(group.rebalance_timeout_s(), self._complete_join, group)
        log.info(
            "group %s: rebalancing at generation %d (%s)",
            group.group_id,
            group.generation_id,
            reason,
        )

    def _initial_delay_over(self, group: Group) -> None:
        remaining = group.rebalance_deadline - self._now()
        if group.new_member_added and remaining > 0:
            group.new_member_added = False
            delay = min(self._settings.initial_rebalance_delay_ms / 1000, remaining)
            group.timer = asyncio.get_running_loop().call_later(
                delay, self._initial_delay_over, group
            )
            return
        group.in_initial_delay = False
        self._complete_join(group)

    def _try_complete_join(self, group: Group) -> None:
        if (
            group.state is GroupState.PREPARING_REBALANCE
            and not group.in_initial_delay
            and group.all_joined()
        ):
            self._complete_join(group)

    def _complete_join(self, group: Group) -> None:
        if group.state is not GroupState.PREPARING_REBALANCE:
            return
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        group.in_initial_delay = False
        for member in [m for m in group.members.values() if not m.awaiting_join]:
            log.info("group %s: member %s did not rejoin", group.group_id, member.member_id)
            del group.members[member.member_id]
        group.pending.clear()
        group.generation_id += 1
        if not group.members:
            group.state, group.protocol_name, group.leader_id = GroupState.EMPTY, None, None
            log.info("group %s: empty at generation %d", group.group_id, group.generation_id)
            return
        group.protocol_name = group.select_protocol()
        if group.leader_id not in group.members:
            group.leader_id = next(iter(group.members))
        group.state = GroupState.COMPLETING_REBALANCE
        now = self._now()
        for member in group.members.values():
            member.touch(now)
            if member.join_waiter is not None and not member.join_waiter.done():
                member.join_waiter.set_result(group.join_result(member))
            member.join_waiter = None
        log.info(
            "group %s: generation %d with %d member(s), protocol %s",
            group.group_id,
            group.generation_id,
            len(group.members),
            group.protocol_name,
        )

    async def sync(
        self, group_id: str, generation_id: int, member_id: str, assignments: dict[str, bytes]
    ) -> SyncResult:
        """Waits for the leader's assignment and hands each member its own."""
        group = self._groups.get(group_id)
        member = group.members.get(member_id) if group is not None else None
        if group is None or member is None or group.state is GroupState.EMPTY:
            return SyncResult(ErrorCode.UNKNOWN_MEMBER_ID)
        if generation_id != group.generation_id:
            return SyncResult(ErrorCode.ILLEGAL_GENERATION)
        if group.state is GroupState.PREPARING_REBALANCE:
            return SyncResult(ErrorCode.REBALANCE_IN_PROGRESS)
        member.touch(self._now())
        if group.state is GroupState.STABLE:
            return SyncResult(ErrorCode.NONE, member.assignment)
        self._resolve_sync(member, SyncResult(ErrorCode.REBALANCE_IN_PROGRESS))
        waiter: asyncio.Future[SyncResult] = asyncio.get_running_loop().create_future()
        member.sync_waiter = waiter
        if member_id == group.leader_id:
            for each in group.members.values():
                each.assignment = assignments.get(each.member_id, b"")
            group.state = GroupState.STABLE
            for each in group.members.values():
                self._resolve_sync(each, SyncResult(ErrorCode.NONE, each.assignment))
            log.info("group %s: stable at generation %d", group_id, generation_id)
        return await self._wait(member, waiter)

    @staticmethod
    def _resolve_sync(member: Member, result: SyncResult) -> None:
        if member.sync_waiter is not None and not member.sync_waiter.done():
            member.sync_waiter.set_result(result)
        member.sync_waiter = None

    def heartbeat(self, group_id: str, generation_id: int, member_id: str) -> ErrorCode:
        """Keeps the member's session; REBALANCE_IN_PROGRESS while the group rebalances."""
        group = self._groups.get(group_id)
        member = group.members.get(member_id) if group is not None else None
        if group is None or member is None:
            return ErrorCode.UNKNOWN_MEMBER_ID
        if generation_id != group.generation_id:
            return ErrorCode.ILLEGAL_GENERATION
        member.touch(self._now())
        if group.state is GroupState.PREPARING_REBALANCE:
            return ErrorCode.REBALANCE_IN_PROGRESS
        return ErrorCode.NONE

    def leave(self, group_id: str, member_id: str) -> ErrorCode:
        group = self._groups.get(group_id)
        if group is None:
            return ErrorCode.UNKNOWN_MEMBER_ID
        if group.pending.pop(member_id, None) is not None:
            self._try_complete_join(group)
            return ErrorCode.NONE
        member = group.members.get(member_id)
        if member is None:
            return ErrorCode.UNKNOWN_MEMBER_ID
        self._remove(group, member, "left the group")
        return ErrorCode.NONE

    def _remove(self, group: Group, member: Member, reason: str) -> None:
        del group.members[member.member_id]
        if member.join_waiter is not None and not member.join_waiter.done():
            member.join_waiter.set_result(JoinResult(ErrorCode.UNKNOWN_MEMBER_ID, member.member_id))
        self._resolve_sync(member, SyncResult(ErrorCode.UNKNOWN_MEMBER_ID))
        if group.leader_id == member.member_id:
            group.leader_id = next(iter(group.members), None)
        log.info("group %s: member %s %s", group.group_id, member.member_id, reason)
        if group.state in (GroupState.STABLE, GroupState.COMPLETING_REBALANCE):
            self._prepare_rebalance(group, f"member {member.member_id} {reason}")
        self._try_complete_join(group)

    def check_commit(self, group_id: str, generation_id: int, member_id: str) -> ErrorCode:
        """May this OffsetCommit be applied? Generation -1 is a commit outside group
        management, accepted only while the group has no members."""
        if not group_id:
            return ErrorCode.INVALID_GROUP_ID
        group = self._groups.get(group_id)
        if group is None:
            return ErrorCode.NONE if generation_id < 0 else ErrorCode.ILLEGAL_GENERATION
        if generation_id < 0 and group.state is GroupState.EMPTY:
            return ErrorCode.NONE
        if group.state is GroupState.COMPLETING_REBALANCE:
            return ErrorCode.REBALANCE_IN_PROGRESS
        member = group.members.get(member_id)
        if member is None:
            return ErrorCode.UNKNOWN_MEMBER_ID
        if generation_id != group.generation_id:
            return ErrorCode.ILLEGAL_GENERATION
        member.touch(self._now())
        return ErrorCode.NONE

    def expire(self) -> None:
        """Removes members whose session lapsed (none waiting on a join or sync; the group
        rebalances) and pending member ids never used."""
        now = self._now()
        for group in list(self._groups.values()):
            for member_id, lapses in list(group.pending.items()):
                if lapses < now:
                    del group.pending[member_id]
                    self._try_complete_join(group)
            for member in list(group.members.values()):
                if not (member.awaiting_join or member.awaiting_sync) and member.deadline < now:
                    self._remove(group, member, "missed its session timeout")

    def close(self) -> None:
        for group in self._groups.values():
            if group.timer is not None:
                group.timer.cancel()
        self._groups.clear()
