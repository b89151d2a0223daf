"""JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch, ListGroups and
DescribeGroups.

Thin: each converts the request to a coordinator or offset-store call and the result back.
ListGroups and DescribeGroups show the groups that had members since the broker started,
and, as Empty groups of no protocol type, those known only by their committed offsets;
authorized operations are not reported (there is no authorization).
Static membership (``group_instance_id``) is not implemented: such a member is treated as
a dynamic one. OffsetCommit is acknowledged only after the commit is in the offsets file.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from localkafka.coordinator import GroupCoordinator
from localkafka.errors import ErrorCode
from localkafka.group import GroupState, JoinRequest
from localkafka.offsets import CommittedOffset, OffsetStore, TopicPartition
from localkafka.protocol import ApiKey, Body, Handler, RequestContext
from localkafka.topics import TopicStore

log = logging.getLogger(__name__)

MAX_METADATA_CHARS = 4096  # Kafka's offset.metadata.max.bytes
_NO_OPERATIONS_ASKED = -(2**31)  # DescribeGroups v3: authorized operations not requested
_DEAD = "Dead"  # Kafka's state for a group it does not know


class GroupHandlers:
    def __init__(
        self, coordinator: GroupCoordinator, offsets: OffsetStore, topics: TopicStore
    ) -> None:
        self._coordinator = coordinator
        self._offsets = offsets
        self._topics = topics

    def routes(self) -> dict[ApiKey, Handler]:
        return {
            ApiKey.JOIN_GROUP: self.join_group,
            ApiKey.SYNC_GROUP: self.sync_group,
            ApiKey.HEARTBEAT: self.heartbeat,
            ApiKey.LEAVE_GROUP: self.leave_group,
            ApiKey.OFFSET_COMMIT: self.offset_commit,
            ApiKey.OFFSET_FETCH: self.offset_fetch,
            ApiKey.LIST_GROUPS: self.list_groups,
            ApiKey.DESCRIBE_GROUPS: self.describe_groups,
        }

    async def list_groups(self, ctx: RequestContext, request: Body) -> Body:
        kinds = {group_id: "" for group_id in self._offsets.group_ids()}
        kinds.update({g.group_id: g.protocol_type for g in self._coordinator.groups()})
        return {
            "throttle_time_ms": 0,
            "error_code": ErrorCode.NONE,
            "groups": [{"group": g, "protocol_type": kind} for g, kind in sorted(kinds.items())],
        }

    async def describe_groups(self, ctx: RequestContext, request: Body) -> Body:
        return {"throttle_time_ms": 0, "groups": [self._describe(g) for g in request["groups"]]}

    def _describe(self, group_id: str) -> Body:
        entry: Body = {
            "error_code": ErrorCode.NONE,
            "group": group_id,
            "state": _DEAD,
            "protocol_type": "",
            "protocol": "",
            "members": [],
            "authorized_operations": _NO_OPERATIONS_ASKED,
        }
        group = self._coordinator.group(group_id)
        if group is None:
            if self._offsets.group(group_id):
                entry["state"] = GroupState.EMPTY.value
            return entry
        stable = group.state is GroupState.STABLE  # Kafka shows the protocol only then
        protocol = (group.protocol_name or "") if stable else ""
        entry.update(state=group.state.value, protocol_type=group.protocol_type, protocol=protocol)
        entry["members"] = [
            {
                "member_id": member.member_id,
                "client_id": member.request.client_id,
                "client_host": member.request.client_host,
                "member_metadata": member.metadata_for(protocol) if stable else b"",
                "member_assignment": member.assignment if stable else b"",
            }
            for member in group.members.values()
        ]
        return entry

    async def join_group(self, ctx: RequestContext, request: Body) -> Body:
        session_timeout_ms: int = request["session_timeout"]
        result = await self._coordinator.join(
            JoinRequest(
                group_id=request["group"] or "",
                member_id=request["member_id"] or "",
                group_instance_id=request.get("group_instance_id"),
                client_id=ctx.client_id,
                client_host=ctx.client_host,
                session_timeout_ms=session_timeout_ms,
                rebalance_timeout_ms=request.get("rebalance_timeout", session_timeout_ms),
                protocol_type=request["protocol_type"] or "",
                protocols=tuple(
                    (p["protocol_name"], p["protocol_metadata"] or b"")
                    for p in request["group_protocols"]
                ),
                require_known_member_id=ctx.api_version >= 4,
            )
        )
        return {
            "throttle_time_ms": 0,
            "error_code": result.error,
            "generation_id": result.generation_id,
            "group_protocol": result.protocol_name or "",
            "leader_id": result.leader_id,
            "member_id": result.member_id,
            "members": [
                {"member_id": member, "group_instance_id": instance, "member_metadata": metadata}
                for member, instance, metadata in result.members
            ],
        }

    async def sync_group(self, ctx: RequestContext, request: Body) -> Body:
        assignments = {
            a["member_id"]: a["member_metadata"] or b"" for a in request["group_assignment"]
        }
        result = await self._coordinator.sync(
            request["group"], request["generation_id"], request["member_id"], assignments
        )
        return {
            "throttle_time_ms": 0,
            "error_code": result.error,
            "member_assignment": result.assignment,
        }

    async def heartbeat(self, ctx: RequestContext, request: Body) -> Body:
        error = self._coordinator.heartbeat(
            request["group"], request["generation_id"], request["member_id"]
        )
        return {"throttle_time_ms": 0, "error_code": error}

    async def leave_group(self, ctx: RequestContext, request: Body) -> Body:
        error = self._coordinator.leave(request["group"], request["member_id"])
        return {"throttle_time_ms": 0, "error_code": error}

    async def offset_commit(self, ctx: RequestContext, request: Body) -> Body:
        group_id = request["consumer_group"] or ""
        error = self._coordinator.check_commit(
            group_id, request["consumer_group_generation_id"], request["consumer_id"] or ""
        )
        commits: dict[TopicPartition, CommittedOffset] = {}
        accepted: list[Body] = []
        topics = []
        for entry in request["topics"]:
            partitions = []
            for part in entry["partitions"]:
                result: Body = {"partition": part["partition"], "error_code": error}
                metadata = part["metadata"] or ""
                if error:
                    pass
                elif self._topics.partition(entry["topic"], part["partition"]) is None:
                    result["error_code"] = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
                elif len(metadata) > MAX_METADATA_CHARS:
                    result["error_code"] = ErrorCode.OFFSET_METADATA_TOO_LARGE
                else:
                    commits[(entry["topic"], part["partition"])] = CommittedOffset(
                        part["offset"], metadata
                    )
                    accepted.append(result)
                partitions.append(result)
            topics.append({"topic": entry["topic"], "partitions": partitions})
        try:
            self._offsets.commit(group_id, commits)
        except OSError as exc:
            log.error("committing offsets of group %s failed: %s", group_id, exc)
            for result in accepted:
                result["error_code"] = ErrorCode.KAFKA_STORAGE_ERROR
        return {"throttle_time_ms": 0, "topics": topics}

    async def offset_fetch(self, ctx: RequestContext, request: Body) -> Body:
        group_id = request["consumer_group"] or ""
        stored = self._offsets.group(group_id)
        wanted: list[tuple[str, list[int]]]
        if request["topics"] is None:  # v2+: every partition the group committed
            by_topic: dict[str, list[int]] = defaultdict(list)
            for topic, partition in stored:
                by_topic[topic].append(partition)
            wanted = sorted(by_topic.items())
        else:
            wanted = [(entry["topic"], entry["partitions"]) for entry in request["topics"]]
        topics = []
        for topic, partitions in wanted:
            results = []
            for partition in partitions:
                commit = stored.get((topic, partition))
                results.append(
                    {
                        "partition": partition,
                        "offset": commit.offset if commit else -1,
                        "metadata": commit.metadata if commit else "",
                        "error_code": ErrorCode.NONE,
                    }
                )
            topics.append({"topic": topic, "partitions": results})
        error = ErrorCode.NONE if group_id else ErrorCode.INVALID_GROUP_ID
        return {"throttle_time_ms": 0, "topics": topics, "error_code": error}
