"""Metadata, FindCoordinator, CreateTopics, DeleteTopics and DescribeConfigs.

The broker is node 0, the controller, the leader of every partition and the coordinator of
every group; it coordinates no transactions. Unknown topics are UNKNOWN_TOPIC_OR_PARTITION
unless the broker auto-creates topics and the request allows it (Metadata v4+
``allow_auto_topic_creation``).
"""

from __future__ import annotations

import logging
from collections import Counter

from localkafka.errors import ErrorCode, KafkaApiError
from localkafka.offsets import OffsetStore
from localkafka.protocol import ApiKey, Body, Handler, RequestContext
from localkafka.settings import BrokerSettings
from localkafka.topics import TopicStore, check_topic_name, parse_configs

log = logging.getLogger(__name__)

NODE_ID = 0
_TOPIC_RESOURCE, _BROKER_RESOURCE = 2, 4
_GROUP_COORDINATOR = 0  # FindCoordinator's key type 1 is a transaction coordinator
_TOPIC_CONFIG_SOURCE, _STATIC_BROKER_CONFIG_SOURCE = 1, 4


class ClusterHandlers:
    def __init__(
        self,
        topics: TopicStore,
        offsets: OffsetStore,
        settings: BrokerSettings,
        cluster_id: str,
    ) -> None:
        self._topics = topics
        self._offsets = offsets
        self._settings = settings
        self._cluster_id = cluster_id
        self.address = (settings.advertised_host or settings.host, settings.port)
        """(host, port) given to clients; the broker sets the port it bound."""

    def routes(self) -> dict[ApiKey, Handler]:
        return {
            ApiKey.METADATA: self.metadata,
            ApiKey.FIND_COORDINATOR: self.find_coordinator,
            ApiKey.CREATE_TOPICS: self.create_topics,
            ApiKey.DELETE_TOPICS: self.delete_topics,
            ApiKey.DESCRIBE_CONFIGS: self.describe_configs,
        }

    async def metadata(self, ctx: RequestContext, request: Body) -> Body:
        names = request["topics"]
        auto = self._settings.auto_create_topics and request.get("allow_auto_topic_creation", True)
        host, port = self.address
        return {
            "throttle_time_ms": 0,
            "brokers": [{"node_id": NODE_ID, "host": host, "port": port, "rack": None}],
            "cluster_id": self._cluster_id,
            "controller_id": NODE_ID,
            "topics": [
                self._describe(name, auto)
                for name in (self._topics.names() if names is None else names)
            ],
        }

    def _describe(self, name: str, auto_create: bool) -> Body:
        entry: Body = {"error_code": 0, "topic": name, "is_internal": False, "partitions": []}
        try:
            check_topic_name(name)
            topic = self._topics.get(name)
            if topic is None and auto_create:
                topic = self._topics.create(name, self._settings.default_partitions, {})
        except KafkaApiError as exc:
            entry["error_code"] = exc.code
            return entry
        if topic is None:
            entry["error_code"] = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            return entry
        entry["partitions"] = [
            {
                "error_code": 0,
                "partition": index,
                "leader": NODE_ID,
                "replicas": [NODE_ID],
                "isr": [NODE_ID],
                "offline_replicas": [],
            }
            for index in range(len(topic.partitions))
        ]
        return entry

    async def find_coordinator(self, ctx: RequestContext, request: Body) -> Body:
        host, port = self.address
        response: Body = {
            "throttle_time_ms": 0,
            "error_code": ErrorCode.NONE,
            "error_message": None,
            "coordinator_id": NODE_ID,
            "host": host,
            "port": port,
        }
        if request.get("coordinator_type", 0) != _GROUP_COORDINATOR:
            # Transactions are not served. Kafka's "not available" would have a
            # transactional client retry until it times out; this one it reports at once.
            response.update(
                error_code=ErrorCode.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                error_message="localkafka does not serve transactions",
                coordinator_id=-1,
                host="",
                port=-1,
            )
        return response

    async def create_topics(self, ctx: RequestContext, request: Body) -> Body:
        specs = request["create_topic_requests"]
        named = Counter(spec["topic"] for spec in specs)
        results = []
        for spec in specs:
            error, message = ErrorCode.NONE, None
            try:
                if named[spec["topic"]] > 1:
                    raise KafkaApiError(ErrorCode.INVALID_REQUEST, "topic named more than once")
                partitions = self._partition_count(spec)
                overrides = parse_configs(
                    [(c["config_key"], c["config_value"]) for c in spec["configs"]]
                )
                if request.get("validate_only"):
                    self._topics.check_new(spec["topic"], partitions)
                else:
                    self._topics.create(spec["topic"], partitions, overrides)
            except KafkaApiError as exc:
                error, message = exc.code, exc.message
            except OSError as exc:
                log.error("creating topic %s failed: %s", spec["topic"], exc)
                error, message = ErrorCode.KAFKA_STORAGE_ERROR, str(exc)
            results.append({"topic": spec["topic"], "error_code": error, "error_message": message})
        return {"throttle_time_ms": 0, "topic_errors": results}

    def _partition_count(self, spec: Body) -> int:
        count, replication = spec["num_partitions"], spec["replication_factor"]
        assignment = spec["replica_assignment"] or []
        if assignment:
            if count != -1 or replication != -1:
                raise KafkaApiError(
                    ErrorCode.INVALID_REQUEST,
                    "both a replica assignment and a partition count or replication factor",
                )
            ids = sorted(a["partition_id"] for a in assignment)
            if ids != list(range(len(ids))) or any(a["replicas"] != [NODE_ID] for a in assignment):
                raise KafkaApiError(ErrorCode.INVALID_REPLICA_ASSIGNMENT, "only broker 0 exists")
            return len(ids)
        if replication not in (-1, 1):
            raise KafkaApiError(
                ErrorCode.INVALID_REPLICATION_FACTOR,
                f"Replication factor: {replication} larger than available brokers: 1.",
            )
        if count == -1:
            return self._settings.default_partitions
        if count < 1:
            raise KafkaApiError(
                ErrorCode.INVALID_PARTITIONS, "Number of partitions must be larger than 0."
            )
        return int(count)

    async def delete_topics(self, ctx: RequestContext, request: Body) -> Body:
        results = []
        for name in request["topics"]:
            error = ErrorCode.NONE
            try:
                self._topics.delete(name)
                self._offsets.delete_topic(name)
            except KafkaApiError as exc:
                error = exc.code
            results.append({"topic": name, "error_code": error})
        return {"throttle_time_ms": 0, "topic_error_codes": results}

    async def describe_configs(self, ctx: RequestContext, request: Body) -> Body:
        return {
            "throttle_time_ms": 0,
            "resources": [self._configs(r) for r in request["resources"]],
        }

    def _configs(self, resource: Body) -> Body:
        kind, name, wanted = (
            resource["resource_type"],
            resource["resource_name"],
            resource["config_names"],
        )
        entry: Body = {
            "error_code": 0,
            "error_message": None,
            "resource_type": kind,
            "resource_name": name,
            "config_entries": [],
        }
        values: dict[str, tuple[str, bool]] = {}  # name -> (value, set on the topic)
        settings = self._settings
        topic = self._topics.get(name) if kind == _TOPIC_RESOURCE else None
        if topic is not None:
            config = self._topics.config_for(topic.overrides)
            values["retention.ms"] = (str(config.retention_ms), "retention.ms" in topic.overrides)
            values["segment.bytes"] = (
                str(config.segment_bytes),
                "segment.bytes" in topic.overrides,
            )
            values["cleanup.policy"] = ("delete", False)
        elif kind == _BROKER_RESOURCE and name in ("", str(NODE_ID)):
            values["log.retention.ms"] = (str(settings.retention_ms), False)
            values["log.segment.bytes"] = (str(settings.segment_bytes), False)
            values["auto.create.topics.enable"] = (str(settings.auto_create_topics).lower(), False)
            values["num.partitions"] = (str(settings.default_partitions), False)
        else:
            entry["error_code"] = (
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
                if kind == _TOPIC_RESOURCE
                else ErrorCode.INVALID_REQUEST
            )
            entry["error_message"] = f"no resource {kind}/{name!r}"
            return entry
        entry["config_entries"] = [
            {
                "config_names": key,
                "config_value": value,
                "read_only": kind == _BROKER_RESOURCE,
                "is_default": not overridden,
                "config_source": _TOPIC_CONFIG_SOURCE
                if overridden
                else _STATIC_BROKER_CONFIG_SOURCE,
                "is_sensitive": False,
                "config_synonyms": [],
            }
            for key, (value, overridden) in values.items()
            if wanted is None or key in wanted
        ]
        return entry
