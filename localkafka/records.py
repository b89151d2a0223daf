"""Kafka v2 record batches (magic 2) as bytes: header parsing, CRC checks, offset rewriting.

The broker stores batches exactly as producers sent them, except for the base offset and
the partition leader epoch (set to 0). The batch CRC32C covers neither, so a rewrite needs
no new checksum. The header layout is beside ``HEADER``; the format is Kafka's
(https://kafka.apache.org/documentation/#recordbatch).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.util import calc_crc32c

from localkafka.errors import ErrorCode, InvalidRecordsError

# The batch header: base_offset q | batch_length i | partition_leader_epoch i | magic B |
# crc I | attributes h | last_offset_delta i | first_timestamp q | max_timestamp q |
# producer_id q | producer_epoch h | base_sequence i | records_count i. batch_length counts
# the bytes after itself; the CRC32C spans attributes to the end of the batch.
HEADER = struct.Struct(">qiiBIhiqqqhii")
HEADER_SIZE = HEADER.size  # 61
LOG_OVERHEAD = 12  # base offset and length: the bytes outside batch_length
_CRC_START = 21  # attributes onwards
_PREFIX = struct.Struct(">qi")
_EPOCH = struct.Struct(">i")


class BatchInfo(NamedTuple):
    """Where one batch lies in a buffer, and what the index keeps of it."""

    position: int
    size: int
    base_offset: int
    record_count: int
    max_timestamp: int
    producer_id: int
    """-1 unless an idempotent producer wrote the batch."""
    producer_epoch: int
    base_sequence: int

    @property
    def last_sequence(self) -> int:
        """The sequence number of the batch's last record (sequences wrap at 2**31 - 1)."""
        return (self.base_sequence + self.record_count - 1) % (2**31)


def _parse(buf: bytes | memoryview, pos: int) -> BatchInfo:
    """The batch at ``pos``; raises ``InvalidRecordsError`` if it is not a whole valid one."""
    if len(buf) - pos < HEADER_SIZE:
        raise InvalidRecordsError(ErrorCode.CORRUPT_MESSAGE, "truncated batch header")
    (
        base_offset,
        length,
        _epoch,
        magic,
        crc,
        _attributes,
        last_offset_delta,
        _first_ts,
        max_ts,
        producer_id,
        producer_epoch,
        base_sequence,
        count,
    ) = HEADER.unpack_from(buf, pos)
    if magic != 2:
        raise InvalidRecordsError(
            ErrorCode.UNSUPPORTED_FOR_MESSAGE_FORMAT, f"record batch magic {magic}, want 2"
        )
    size = LOG_OVERHEAD + length
    if size < HEADER_SIZE or pos + size > len(buf):
        raise InvalidRecordsError(ErrorCode.CORRUPT_MESSAGE, f"batch length {length} invalid")
    if count <= 0 or last_offset_delta != count - 1:
        raise InvalidRecordsError(
            ErrorCode.CORRUPT_MESSAGE,
            f"{count} records with last offset delta {last_offset_delta}",
        )
    if calc_crc32c(memoryview(buf)[pos + _CRC_START : pos + size]) != crc:
        raise InvalidRecordsError(ErrorCode.CORRUPT_MESSAGE, "record batch CRC mismatch")
    return BatchInfo(
        pos, size, base_offset, count, max_ts, producer_id, producer_epoch, base_sequence
    )


def split_batches(data: bytes | None, max_batch_bytes: int) -> list[BatchInfo]:
    """Every batch of a produced ``records`` field, which must hold only whole valid batches."""
    if not data:
        raise InvalidRecordsError(ErrorCode.CORRUPT_MESSAGE, "no record batches")
    batches = []
    pos = 0
    while pos < len(data):
        info = _parse(data, pos)
        if info.size > max_batch_bytes:
            raise InvalidRecordsError(
                ErrorCode.MESSAGE_TOO_LARGE, f"batch of {info.size} B over {max_batch_bytes} B"
            )
        batches.append(info)
        pos += info.size
    return batches


def valid_prefix(buf: bytes, first_offset: int) -> tuple[list[BatchInfo], int]:
    """The batches of a stored segment up to the first torn, corrupt or out-of-sequence one.

    Returns them and the byte length they cover; what follows is to be truncated.
    """
    batches: list[BatchInfo] = []
    pos = 0
    expected = first_offset
    while pos < len(buf):
        try:
            info = _parse(buf, pos)
        except InvalidRecordsError:
            break
        if info.base_offset != expected:
            break
        batches.append(info)
        pos += info.size
        expected += info.record_count
    return batches, pos


def assign_offsets(data: bytes, batches: list[BatchInfo], base_offset: int) -> bytearray:
    """A copy of ``data`` whose batches start at ``base_offset`` and run on contiguously."""
    out = bytearray(data)
    offset = base_offset
    for info in batches:
        _PREFIX.pack_into(out, info.position, offset, info.size - LOG_OVERHEAD)
        _EPOCH.pack_into(out, info.position + LOG_OVERHEAD, 0)
        offset += info.record_count
    return out


def first_at_or_after(batch: bytes, timestamp: int) -> tuple[int, int] | None:
    """(offset, timestamp) of the first record in ``batch`` stamped at or after ``timestamp``."""
    for record in DefaultRecordBatch(batch):
        if record.timestamp >= timestamp:
            return record.offset, record.timestamp
    return None
