"""One consumer group under the classic group protocol: its settings, its state, and the
results the coordinator answers with. The transitions live in ``localkafka.coordinator``.

States, as Kafka names them::

    Empty --join--> PreparingRebalance --all joined / timeout--> CompletingRebalance
    CompletingRebalance --leader's SyncGroup--> Stable
    Stable / CompletingRebalance --join with new metadata, leave, expiry--> PreparingRebalance
    PreparingRebalance --nobody rejoined--> Empty
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from localkafka.errors import ErrorCode


@dataclass(frozen=True)
class GroupSettings:
    initial_rebalance_delay_ms: int = 100
    """How long a new group waits for more members before its first generation."""
    min_session_timeout_ms: int = 6000
    """The shortest session timeout a member may ask for (Kafka's default bound)."""
    max_session_timeout_ms: int = 1_800_000
    """The longest session timeout a member may ask for."""


class GroupState(Enum):
    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"


@dataclass(frozen=True)
class JoinResult:
    error: ErrorCode
    member_id: str
    generation_id: int = -1
    protocol_name: str | None = None
    leader_id: str = ""
    members: tuple[tuple[str, str | None, bytes], ...] = ()
    """(member id, group instance id, metadata): the leader's alone; empty for the others."""


@dataclass(frozen=True)
class SyncResult:
    error: ErrorCode
    assignment: bytes = b""


@dataclass(frozen=True)
class JoinRequest:
    group_id: str
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocol_type: str
    protocols: tuple[tuple[str, bytes], ...]
    require_known_member_id: bool
    """JoinGroup v4+: a new member first gets MEMBER_ID_REQUIRED and its id (KIP-394)."""


@dataclass(eq=False)
class Member:
    member_id: str
    request: JoinRequest
    """The member's latest JoinGroup: its timeouts, protocol type and protocols."""
    deadline: float = 0.0
    """Loop time after which a member that is not waiting on a join or sync is expired."""
    assignment: bytes = b""
    join_waiter: asyncio.Future[JoinResult] | None = None
    sync_waiter: asyncio.Future[SyncResult] | None = None

    @property
    def awaiting_join(self) -> bool:
        return self.join_waiter is not None and not self.join_waiter.done()

    @property
    def awaiting_sync(self) -> bool:
        return self.sync_waiter is not None and not self.sync_waiter.done()

    def metadata_for(self, protocol: str) -> bytes:
        return next(meta for name, meta in self.request.protocols if name == protocol)

    def touch(self, now: float) -> None:
        self.deadline = now + self.request.session_timeout_ms / 1000


@dataclass(eq=False)
class Group:
    group_id: str
    state: GroupState = GroupState.EMPTY
    protocol_type: str = ""
    """The kind of group ("consumer"), from its members' JoinGroup; kept when it empties."""
    generation_id: int = 0
    protocol_name: str | None = None
    leader_id: str | None = None
    members: dict[str, Member] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)
    """Member ids handed out with MEMBER_ID_REQUIRED, to the loop time they lapse at."""
    timer: asyncio.TimerHandle | None = None
    in_initial_delay: bool = False
    new_member_added: bool = False
    rebalance_deadline: float = 0.0

    def accepts(self, request: JoinRequest) -> bool:
        """Whether the protocol type matches and some protocol is common to every member."""
        if not request.protocols or not request.protocol_type:
            return False
        if not self.members:
            return True
        first = next(iter(self.members.values()))
        if first.request.protocol_type != request.protocol_type:
            return False
        return bool(self.candidate_protocols() & {name for name, _ in request.protocols})

    def candidate_protocols(self) -> set[str]:
        names = [{name for name, _ in m.request.protocols} for m in self.members.values()]
        return set.intersection(*names) if names else set()

    def select_protocol(self) -> str:
        """Each member votes for its most preferred common protocol; the most votes win."""
        candidates = self.candidate_protocols()
        votes = Counter(
            next(name for name, _ in m.request.protocols if name in candidates)
            for m in self.members.values()
        )
        return votes.most_common(1)[0][0]

    def all_joined(self) -> bool:
        return not self.pending and all(m.awaiting_join for m in self.members.values())

    def rebalance_timeout_s(self) -> float:
        timeouts = [m.request.rebalance_timeout_ms for m in self.members.values()]
        return max(timeouts, default=0) / 1000

    def join_result(self, member: Member) -> JoinResult:
        """The current generation as ``member`` is told it."""
        protocol = self.protocol_name or ""
        members: tuple[tuple[str, str | None, bytes], ...] = ()
        if member.member_id == self.leader_id:
            members = tuple(
                (m.member_id, m.request.group_instance_id, m.metadata_for(protocol))
                for m in self.members.values()
            )
        return JoinResult(
            ErrorCode.NONE,
            member.member_id,
            self.generation_id,
            protocol,
            self.leader_id or "",
            members,
        )
