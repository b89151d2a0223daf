"""Produce, InitProducerId, Fetch, ListOffsets and DeleteRecords: the handlers that touch
partition logs.

Produce answers every acks level once the batches are in the file (acks=0: no response, and
a failure closes the connection); idempotent producers' batches are checked for sequence
(``localkafka.producers``). InitProducerId serves idempotent producers only: transactions
are not served. Fetch is a long poll (``fetch``). Per API: docs/kafka-apis.md.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from localkafka.errors import ErrorCode, KafkaApiError, MalformedRequestError
from localkafka.log import PartitionLog
from localkafka.producers import ProducerIds
from localkafka.protocol import ApiKey, Body, Handler, RequestContext
from localkafka.records import split_batches
from localkafka.settings import BrokerSettings
from localkafka.topics import TopicStore

log = logging.getLogger(__name__)

_NO_LIMIT = 2**31 - 1


class DataHandlers:
    def __init__(
        self, topics: TopicStore, settings: BrokerSettings, producer_ids: ProducerIds
    ) -> None:
        self._topics = topics
        self._settings = settings
        self._producer_ids = producer_ids

    def routes(self) -> dict[ApiKey, Handler]:
        return {
            ApiKey.PRODUCE: self.produce,
            ApiKey.INIT_PRODUCER_ID: self.init_producer_id,
            ApiKey.FETCH: self.fetch,
            ApiKey.LIST_OFFSETS: self.list_offsets,
            ApiKey.DELETE_RECORDS: self.delete_records,
        }

    def _writable(self, topic: str, partition: int) -> PartitionLog | None:
        found = self._topics.partition(topic, partition)
        if found is None and self._settings.auto_create_topics and not self._topics.get(topic):
            try:
                self._topics.create(topic, self._settings.default_partitions, {})
            except KafkaApiError:
                return None
            found = self._topics.partition(topic, partition)
        return found

    async def produce(self, ctx: RequestContext, request: Body) -> Body | None:
        acks = request["required_acks"]
        failed = []
        topics = []
        for entry in request["topics"]:
            partitions = []
            for part in entry["partitions"]:
                result = self._produce_one(
                    acks, entry["topic"], part["partition"], part["messages"]
                )
                if result["error_code"]:
                    failed.append((entry["topic"], part["partition"], result["error_message"]))
                partitions.append(result)
            topics.append({"topic": entry["topic"], "partitions": partitions})
        if acks == 0:
            if failed:
                raise MalformedRequestError(f"acks=0 produce failed: {failed}")
            return None
        return {"throttle_time_ms": 0, "topics": topics}

    def _produce_one(self, acks: int, topic: str, partition: int, data: bytes | None) -> Body:
        result: Body = {
            "partition": partition,
            "error_code": ErrorCode.NONE,
            "offset": -1,
            "timestamp": -1,  # LogAppendTime is not used: -1 as Kafka sends for CreateTime
            "log_start_offset": -1,
            "record_errors": [],
            "error_message": None,
        }
        target = self._writable(topic, partition)
        if acks not in (0, 1, -1):
            result["error_code"] = ErrorCode.INVALID_REQUIRED_ACKS
        elif target is None:
            result["error_code"] = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        else:
            try:
                batches = split_batches(data, self._settings.max_batch_bytes)
                result["offset"] = target.append(data or b"", batches)
            except KafkaApiError as exc:
                result["error_code"], result["error_message"] = exc.code, exc.message
            except OSError as exc:
                log.error("append to %s-%d failed: %s", topic, partition, exc)
                result["error_code"] = ErrorCode.KAFKA_STORAGE_ERROR
            result["log_start_offset"] = target.log_start_offset
        return result

    async def init_producer_id(self, ctx: RequestContext, request: Body) -> Body:
        response: Body = {
            "throttle_time_ms": 0,
            "error_code": ErrorCode.NONE,
            "producer_id": -1,
            "producer_epoch": -1,
        }
        if request["transactional_id"] is not None:  # no transactional API is advertised
            response["error_code"] = ErrorCode.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            return response
        try:
            response["producer_id"] = self._producer_ids.allocate()
        except OSError as exc:
            log.error("allocating a producer id failed: %s", exc)
            response["error_code"] = ErrorCode.KAFKA_STORAGE_ERROR
            return response
        response["producer_epoch"] = 0
        return response

    async def fetch(self, ctx: RequestContext, request: Body) -> Body:
        """A long poll: answers at once when ``min_bytes`` are available or a partition has
        an error, else when data arrives on any requested partition or ``max_wait_time``
        passes. Each partition gives whole batches up to its ``max_bytes``, at least one;
        the response stops taking partitions once it holds ``max_bytes``."""
        response: Body = {"throttle_time_ms": 0, "error_code": 0, "session_id": 0, "topics": []}
        if request.get("session_id", 0) != 0:
            response["error_code"] = ErrorCode.FETCH_SESSION_ID_NOT_FOUND
            return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(request["max_wait_time"], 0) / 1000
        while True:
            topics, size, has_error = self._read(request)
            remaining = deadline - loop.time()
            if has_error or size >= request["min_bytes"] or remaining <= 0:
                response["topics"] = topics
                return response
            await self._wait_for_append(request, remaining)

    def _read(self, request: Body) -> tuple[list[Body], int, bool]:
        budget = request.get("max_bytes", _NO_LIMIT)
        read_committed = request.get("isolation_level", 0) == 1
        size = 0
        has_error = False
        topics = []
        for entry in request["topics"]:
            partitions = []
            for part in entry["partitions"]:
                offset = part["fetch_offset"] if "fetch_offset" in part else part["offset"]
                limit = min(part["max_bytes"], budget - size) if size < budget else 0
                result = self._read_one(entry["topic"], part["partition"], offset, limit)
                result["aborted_transactions"] = [] if read_committed else None
                size += len(result["message_set"])
                has_error = has_error or bool(result["error_code"])
                partitions.append(result)
            topics.append({"topics": entry["topic"], "partitions": partitions})
        return topics, size, has_error

    def _read_one(self, topic: str, partition: int, offset: int, limit: int) -> Body:
        target = self._topics.partition(topic, partition)
        result: Body = {
            "partition": partition,
            "error_code": ErrorCode.NONE,
            "highwater_offset": -1,
            "last_stable_offset": -1,
            "log_start_offset": -1,
            "preferred_read_replica": -1,
            "message_set": b"",
        }
        if target is None:
            result["error_code"] = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            return result
        result["highwater_offset"] = result["last_stable_offset"] = target.high_watermark
        result["log_start_offset"] = target.log_start_offset
        try:
            if limit > 0:
                result["message_set"] = target.read(offset, limit)
            elif not target.log_start_offset <= offset <= target.high_watermark:
                result["error_code"] = ErrorCode.OFFSET_OUT_OF_RANGE
        except KafkaApiError as exc:
            result["error_code"] = exc.code
        return result

    async def _wait_for_append(self, request: Body, timeout_s: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        logs = [
            target
            for entry in request["topics"]
            for part in entry["partitions"]
            if (target := self._topics.partition(entry["topic"], part["partition"])) is not None
        ]
        for target in logs:
            target.add_waiter(waiter)
        try:
            await asyncio.wait([waiter], timeout=timeout_s)
        finally:
            for target in logs:
                target.discard_waiter(waiter)

    async def list_offsets(self, ctx: RequestContext, request: Body) -> Body:
        topics = []
        for entry in request["topics"]:
            partitions = [
                self._list_one(entry["topic"], part["partition"], part["timestamp"])
                for part in entry["partitions"]
            ]
            topics.append({"topic": entry["topic"], "partitions": partitions})
        return {"throttle_time_ms": 0, "topics": topics}

    def _list_one(self, topic: str, partition: int, timestamp: int) -> Body:
        target = self._topics.partition(topic, partition)
        error, offset, found_ts = ErrorCode.NONE, -1, -1
        if target is None:
            error = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        elif timestamp == -1:  # latest
            offset = target.high_watermark
        elif timestamp == -2:  # earliest
            offset = target.log_start_offset
        else:
            found = target.offset_for_timestamp(timestamp)
            if found is not None:
                offset, found_ts = found
        result: dict[str, Any] = {"partition": partition, "error_code": error}
        result.update(timestamp=found_ts, offset=offset, offsets=[offset], leader_epoch=0)
        return result

    async def delete_records(self, ctx: RequestContext, request: Body) -> Body:
        topics = []
        for entry in request["topics"]:
            partitions = []
            for part in entry["partitions"]:
                target = self._topics.partition(entry["name"], part["partition_index"])
                error, low = ErrorCode.NONE, -1
                if target is None:
                    error = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
                else:
                    try:
                        low = target.delete_records(part["offset"])
                    except KafkaApiError as exc:
                        error = exc.code
                partitions.append(
                    {
                        "partition_index": part["partition_index"],
                        "low_watermark": low,
                        "error_code": error,
                    }
                )
            topics.append({"name": entry["name"], "partitions": partitions})
        return {"throttle_time_ms": 0, "topics": topics}
