"""The Kafka APIs and versions the broker serves, and their codec, on aiokafka's structs.

Requests decode into plain dicts; handlers answer with dicts that hold every field any
served version of the response has, and ``encode_response`` keeps the negotiated version's
fields. ``SUPPORTED`` is what ApiVersions advertises (how its ranges were chosen: beside
it). ``KNOWN`` is every request aiokafka can decode, served or not, so a well-formed request
the broker does not serve is answered with UNSUPPORTED_VERSION rather than a closed
connection (``localkafka.dispatch``). The served table: docs/kafka-apis.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from types import ModuleType
from typing import Any

from aiokafka.protocol import (
    admin,
    commit,
    coordination,
    fetch,
    group,
    metadata,
    offset,
    produce,
    transaction,
)
from aiokafka.protocol.api import (
    RequestHeader_v1,
    RequestStruct,
    Response,
    ResponseHeader_v0,
    ResponseHeader_v1,
)
from aiokafka.protocol.types import (
    Array,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from localkafka.errors import MalformedRequestError

Body = dict[str, Any]


class ApiKey(IntEnum):
    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    JOIN_GROUP = 11
    HEARTBEAT = 12
    LEAVE_GROUP = 13
    SYNC_GROUP = 14
    DESCRIBE_GROUPS = 15
    LIST_GROUPS = 16
    API_VERSIONS = 18
    CREATE_TOPICS = 19
    DELETE_TOPICS = 20
    DELETE_RECORDS = 21
    INIT_PRODUCER_ID = 22
    DESCRIBE_CONFIGS = 32


class ApiVersionResponse_v3(Response):  # type: ignore[misc]  # aiokafka is untyped here
    API_KEY = 18
    API_VERSION = 3
    SCHEMA = Schema(
        ("error_code", Int16),
        (
            "api_versions",
            CompactArray(
                ("api_key", Int16),
                ("min_version", Int16),
                ("max_version", Int16),
                ("tags", TaggedFields),
            ),
        ),
        ("throttle_time_ms", Int32),
        ("tags", TaggedFields),
    )


class ApiVersionRequest_v3(RequestStruct):  # type: ignore[misc]  # aiokafka is untyped here
    API_KEY = 18
    API_VERSION = 3
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = ApiVersionResponse_v3
    SCHEMA = Schema(
        ("client_software_name", CompactString("utf-8")),
        ("client_software_version", CompactString("utf-8")),
        ("tags", TaggedFields),
    )


StructPair = tuple[Any, Any]  # (aiokafka request struct class, response struct class)


def _versions(
    module: ModuleType, stem: str, low: int, high: int, same_as: Mapping[int, int] | None = None
) -> dict[int, StructPair]:
    pairs = {}
    for version in range(low, high + 1):
        source = (same_as or {}).get(version, version)
        pairs[version] = (
            getattr(module, f"{stem}Request_v{source}"),
            getattr(module, f"{stem}Response_v{source}"),
        )
    return pairs


def _every_known_request() -> dict[tuple[int, int], StructPair]:
    """(API key, version) -> structs, for every request aiokafka defines with its response
    (paired by name: some of aiokafka's RESPONSE_TYPE links point at the version before)."""
    known: dict[tuple[int, int], StructPair] = {}
    modules = (admin, commit, coordination, fetch, group, metadata, offset, produce, transaction)
    for module in modules:
        for name, request in vars(module).items():
            response = getattr(module, name.replace("Request_v", "Response_v"), None)
            if "Request_v" in name and response is not None:
                known[(request.API_KEY, request.API_VERSION)] = (request, response)
    return known


# Per API, up to the newest non-flexible version aiokafka 0.14 has, plus ApiVersions v3: the
# flexible version librdkafka and the Java clients ask for first (structs above; its
# response header stays v0, as KIP-511 requires). ``same_as``: Kafka defines JoinGroup
# v3/v4, SyncGroup v2, CreateTopics v4 and InitProducerId v1 with the wire format of the
# version before (JoinGroup v4+ adds MEMBER_ID_REQUIRED, handled by the coordinator;
# CreateTopics v4 lets a client leave the partition count and replication factor to the
# broker, KIP-464, which every version accepts). ListOffsets stops at v3: aiokafka's v4
# struct cannot be built by its own request builder.
SUPPORTED: dict[ApiKey, dict[int, StructPair]] = {
    ApiKey.PRODUCE: _versions(produce, "Produce", 3, 8),
    ApiKey.FETCH: _versions(fetch, "Fetch", 4, 11),
    ApiKey.LIST_OFFSETS: _versions(offset, "Offset", 1, 3),
    ApiKey.METADATA: _versions(metadata, "Metadata", 1, 5),
    ApiKey.OFFSET_COMMIT: _versions(commit, "OffsetCommit", 2, 3),
    ApiKey.OFFSET_FETCH: _versions(commit, "OffsetFetch", 1, 3),
    ApiKey.FIND_COORDINATOR: _versions(coordination, "FindCoordinator", 0, 1),
    ApiKey.JOIN_GROUP: _versions(group, "JoinGroup", 0, 5, {3: 2, 4: 2}),
    ApiKey.HEARTBEAT: _versions(group, "Heartbeat", 0, 1),
    ApiKey.LEAVE_GROUP: _versions(group, "LeaveGroup", 0, 1),
    ApiKey.SYNC_GROUP: _versions(group, "SyncGroup", 0, 3, {2: 1}),
    ApiKey.DESCRIBE_GROUPS: _versions(admin, "DescribeGroups", 0, 3),
    ApiKey.LIST_GROUPS: _versions(admin, "ListGroups", 0, 2),
    ApiKey.API_VERSIONS: {
        **_versions(admin, "ApiVersion", 0, 2),
        3: (ApiVersionRequest_v3, ApiVersionResponse_v3),
    },
    ApiKey.CREATE_TOPICS: _versions(admin, "CreateTopics", 0, 4, {4: 3}),
    ApiKey.DELETE_TOPICS: _versions(admin, "DeleteTopics", 0, 3),
    ApiKey.DELETE_RECORDS: _versions(admin, "DeleteRecords", 0, 1),
    ApiKey.INIT_PRODUCER_ID: _versions(transaction, "InitProducerId", 0, 1, {1: 0}),
    ApiKey.DESCRIBE_CONFIGS: _versions(admin, "DescribeConfigs", 0, 2),
}

KNOWN: dict[tuple[int, int], StructPair] = {
    **_every_known_request(),
    **{(key, version): pair for key, pairs in SUPPORTED.items() for version, pair in pairs.items()},
}


def advertised_versions() -> list[Body]:
    """The ApiVersions entries: each API with the lowest and highest version served."""
    return [
        {"api_key": int(key), "min_version": min(v), "max_version": max(v)}
        for key, v in SUPPORTED.items()
    ]


@dataclass(frozen=True)
class RequestContext:
    api_key: ApiKey
    api_version: int
    correlation_id: int
    client_id: str
    client_host: str


Handler = Callable[[RequestContext, Body], Awaitable[Body | None]]
"""Answers a decoded request with a response body, or None when none is to be sent."""


@dataclass(frozen=True)
class Header:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str


def decode_header(buffer: BytesIO) -> Header:
    try:
        api_key, api_version, correlation_id, client_id = RequestHeader_v1.SCHEMA.decode(buffer)
    except Exception as exc:  # aiokafka's decoders raise ValueError, struct.error, ...
        raise MalformedRequestError(f"undecodable request header: {exc!r}") from exc
    return Header(api_key, api_version, correlation_id, client_id or "")


def decode_body(request_struct: Any, buffer: BytesIO, size: int) -> Body:
    """The request's fields as a dict; a flexible version's header tags are skipped first."""
    try:
        if request_struct.FLEXIBLE_VERSION:
            TaggedFields.decode(buffer)
        decoded = request_struct.SCHEMA.decode(buffer)
    except Exception as exc:  # aiokafka's decoders raise ValueError, struct.error, ...
        raise MalformedRequestError(f"undecodable {request_struct.__name__}: {exc!r}") from exc
    if buffer.tell() != size:
        raise MalformedRequestError(
            f"{request_struct.__name__}: {size - buffer.tell()} bytes left over"
        )
    return _to_dict(request_struct.SCHEMA, decoded)


def _to_dict(schema: Schema, values: Any) -> Body:
    """Decoded values as a dict (aiokafka's own ``to_object`` fails on a null array)."""
    body: Body = {}
    for name, field, value in zip(schema.names, schema.fields, values, strict=True):
        if isinstance(field, Schema):
            value = _to_dict(field, value)
        elif isinstance(field, Array) and isinstance(field.array_of, Schema) and value is not None:
            value = [_to_dict(field.array_of, item) for item in value]
        body[name] = value
    return body


def _values(schema: Any, body: Mapping[str, Any]) -> list[Any]:
    values: list[Any] = []
    for name, field in zip(schema.names, schema.fields, strict=True):
        if field is TaggedFields:
            values.append({})
            continue
        value = body[name]
        if isinstance(field, Schema):
            value = tuple(_values(field, value))
        elif isinstance(field, Array) and isinstance(field.array_of, Schema) and value is not None:
            value = [tuple(_values(field.array_of, item)) for item in value]
        values.append(value)
    return values


def encode_response(response_struct: Any, correlation_id: int, body: Mapping[str, Any]) -> bytes:
    """The size-prefixed frame of ``body`` in ``response_struct``'s schema."""
    flexible = any(field is TaggedFields for field in response_struct.SCHEMA.fields)
    header = (
        ResponseHeader_v1(correlation_id, {})
        if flexible and response_struct.API_KEY != ApiKey.API_VERSIONS
        else ResponseHeader_v0(correlation_id)
    )
    encoded: bytes = (
        header.encode() + response_struct(*_values(response_struct.SCHEMA, body)).encode()
    )
    return len(encoded).to_bytes(4, "big") + encoded


# Response fields that name what a request asked about, by the names requests use for them.
_SAME_THING = {
    "topic": ("topic", "name", "topics"),
    "topics": ("topic", "name", "topics"),
    "name": ("name", "topic"),
    "partition": ("partition", "partition_index"),
    "partition_index": ("partition_index", "partition"),
    "group": ("group",),
    "resource_type": ("resource_type",),
    "resource_name": ("resource_name",),
}
# Response arrays answering a request array of another name.
_ANSWERS = {"topic_errors": "create_topic_requests", "topic_error_codes": "topics"}


def error_body(schema: Any, code: int, request: Any = None) -> Body:
    """A response of ``schema`` that says ``code`` for everything ``request`` asked about,
    as Kafka's error responses do: every error field set, each topic, partition, group or
    resource the request named answered with it. Other numbers are 0 (offsets and
    timestamps -1), strings empty, the error message null."""
    asked = request if isinstance(request, Mapping) else {}
    body: Body = {}
    for name, field in zip(schema.names, schema.fields, strict=True):
        value: Any
        if name in ("error_code", "error"):
            value = code
        elif isinstance(field, Schema):
            value = error_body(field, code, asked.get(name))
        elif isinstance(field, Array):
            items = asked.get(_ANSWERS.get(name, name))
            if isinstance(field.array_of, Schema) and isinstance(items, list):
                value = [error_body(field.array_of, code, _item(item)) for item in items]
            else:
                value = []
        elif field is TaggedFields:
            value = {}
        elif name == "error_message":
            value = None
        else:
            value = _named(name, field, asked)
        body[name] = value
    return body


def _item(item: Any) -> Any:
    """A request array's item as a mapping: a bare topic name or partition number stands
    for every field that could hold it."""
    if isinstance(item, Mapping):
        return item
    return {key: item for key in _SAME_THING}


def _named(name: str, field: Any, asked: Mapping[str, Any]) -> Any:
    """The request's value for an identifying field, else the field type's neutral value."""
    kind = field.__name__ if isinstance(field, type) else type(field).__name__
    neutral: Any = {"Bytes": b"", "CompactBytes": b"", "Boolean": False, "Int64": -1}.get(kind, 0)
    if not isinstance(field, type):  # a String instance
        neutral = ""
    for key in _SAME_THING.get(name, ()):
        value = asked.get(key)
        if value is not None and isinstance(value, type(neutral)):
            return value
    return neutral
