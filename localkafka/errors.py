"""Kafka error codes the broker answers with, and the broker's own exceptions.

``ErrorCode`` values are the wire codes of the Kafka protocol (``aiokafka.errors.for_code``
maps each to the exception a client raises). Exceptions::

    LocalKafkaError
    ├── MalformedRequestError   the connection that sent it is closed, never the broker
    └── KafkaApiError           carries an ErrorCode and a message for the response
        ├── InvalidRecordsError     a produced record batch is unusable
        └── OffsetOutOfRangeError   an offset outside [log start, high watermark]
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    UNKNOWN_SERVER_ERROR = -1
    NONE = 0
    OFFSET_OUT_OF_RANGE = 1
    CORRUPT_MESSAGE = 2
    UNKNOWN_TOPIC_OR_PARTITION = 3
    MESSAGE_TOO_LARGE = 10
    OFFSET_METADATA_TOO_LARGE = 12
    COORDINATOR_NOT_AVAILABLE = 15
    INVALID_TOPIC_EXCEPTION = 17
    INVALID_REQUIRED_ACKS = 21
    ILLEGAL_GENERATION = 22
    INCONSISTENT_GROUP_PROTOCOL = 23
    INVALID_GROUP_ID = 24
    UNKNOWN_MEMBER_ID = 25
    INVALID_SESSION_TIMEOUT = 26
    REBALANCE_IN_PROGRESS = 27
    UNSUPPORTED_VERSION = 35
    TOPIC_ALREADY_EXISTS = 36
    INVALID_PARTITIONS = 37
    INVALID_REPLICATION_FACTOR = 38
    INVALID_REPLICA_ASSIGNMENT = 39
    INVALID_CONFIG = 40
    INVALID_REQUEST = 42
    UNSUPPORTED_FOR_MESSAGE_FORMAT = 43
    OUT_OF_ORDER_SEQUENCE_NUMBER = 45
    INVALID_PRODUCER_EPOCH = 47
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
    KAFKA_STORAGE_ERROR = 56
    FETCH_SESSION_ID_NOT_FOUND = 70
    MEMBER_ID_REQUIRED = 79
    INVALID_RECORD = 87


class LocalKafkaError(Exception):
    """The root of the broker's exceptions."""


class MalformedRequestError(LocalKafkaError):
    """A frame that cannot be a request we serve: unknown API, unsupported version, bad bytes."""


class KafkaApiError(LocalKafkaError):
    """An error answered in a response field rather than by closing the connection."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(message or code.name)
        self.code = code
        self.message = message or None


class InvalidRecordsError(KafkaApiError):
    """Produced bytes that are not a sequence of valid v2 record batches."""


class OffsetOutOfRangeError(KafkaApiError):
    def __init__(self, offset: int, log_start: int, high_watermark: int) -> None:
        super().__init__(
            ErrorCode.OFFSET_OUT_OF_RANGE,
            f"offset {offset} outside [{log_start}, {high_watermark}]",
        )
