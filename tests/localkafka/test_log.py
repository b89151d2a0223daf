"""The partition log on its own: append, read by bisection, roll, repair, retention."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiokafka.record.default_records import DefaultRecordBatch

from localkafka.errors import (
    ErrorCode,
    InvalidRecordsError,
    KafkaApiError,
    OffsetOutOfRangeError,
)
from localkafka.log import LogConfig, PartitionLog
from localkafka.records import split_batches
from localkafka.segment import segment_name
from tests.localkafka.conftest import make_batch

T0 = 1_700_000_000_000
BIG = LogConfig(retention_ms=-1, segment_bytes=1 << 30)


def append(
    log: PartitionLog,
    values: list[bytes],
    timestamp_ms: int = T0,
    producer: tuple[int, int, int] = (-1, -1, -1),
) -> int:
    data = make_batch(values, timestamp_ms, producer=producer)
    return log.append(data, split_batches(data, 1 << 20))


def records(data: bytes) -> list[tuple[int, bytes | None]]:
    """(offset, value) of every record in a buffer of batches."""
    out: list[tuple[int, bytes | None]] = []
    pos = 0
    while pos < len(data):
        size = 12 + int.from_bytes(data[pos + 8 : pos + 12], "big")
        out.extend((r.offset, r.value) for r in DefaultRecordBatch(data[pos : pos + size]))
        pos += size
    return out


def test_offsets_are_assigned_contiguously_and_read_back_from_any_offset(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    bases = [append(log, [f"{i}-{j}".encode() for j in range(3)]) for i in range(100)]
    assert bases == list(range(0, 300, 3))
    assert log.high_watermark == 300

    # Offset 151 lies inside the batch that starts at 150: the read starts with that batch.
    got = records(log.read(151, 1 << 20))
    assert got[0] == (150, b"50-0")
    assert [o for o, _ in got] == list(range(150, 300))
    assert log.read(300, 1 << 20) == b""
    with pytest.raises(OffsetOutOfRangeError):
        log.read(301, 100)


def test_a_read_gives_whole_batches_within_max_bytes_but_always_one(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    for i in range(10):
        append(log, [b"x" * 100, str(i).encode()])
    one = records(log.read(4, 1))
    assert [o for o, _ in one] == [4, 5]  # one batch although it is over max_bytes
    size = len(log.read(0, 1))
    three = records(log.read(0, 3 * size + size // 2))
    assert [o for o, _ in three] == list(range(6))


def test_a_read_costs_the_bytes_it_returns_not_the_log_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=64 * 1024))
    for i in range(5000):
        append(log, [str(i).encode()])
    assert log.segment_count > 5
    read_bytes: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        read_bytes.append(size)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    data = log.read(4321, 1)
    assert records(data) == [(4321, b"4321")]
    assert read_bytes == [len(data)]


def test_segments_roll_at_segment_bytes_and_reads_cross_them(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=1000))
    for i in range(40):
        append(log, [b"v" * 50, str(i).encode()])
    files = sorted(p.name for p in tmp_path.glob("*.log"))
    assert len(files) == log.segment_count > 3
    assert all(p.stat().st_size <= 1000 for p in tmp_path.glob("*.log"))
    offsets = []
    offset = 0
    while offset < log.high_watermark:
        got = records(log.read(offset, 1 << 20))
        offsets += [o for o, _ in got]
        offset = got[-1][0] + 1
    assert offsets == list(range(80))


def test_reopening_rebuilds_the_index(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=500))
    for i in range(30):
        append(log, [str(i).encode()])
    before = log.read(17, 1 << 20)
    log.close()
    again = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=500))
    assert again.high_watermark == 30
    assert again.read(17, 1 << 20) == before
    assert append(again, [b"next"]) == 30


def test_a_torn_tail_is_truncated_at_open(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    for i in range(3):
        append(log, [str(i).encode(), b"more"])
    log.close()
    path = tmp_path / segment_name(0)
    os.truncate(path, path.stat().st_size - 7)  # a crash in the middle of the last write

    repaired = PartitionLog.open(tmp_path, BIG)
    assert repaired.high_watermark == 4
    assert records(repaired.read(0, 1 << 20))[-1] == (3, b"more")
    assert append(repaired, [b"after"]) == 4
    assert records(repaired.read(4, 1 << 20)) == [(4, b"after")]


def test_a_corrupt_batch_and_everything_after_it_are_dropped(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=200))
    for i in range(10):
        append(log, [str(i).encode()])
    log.close()
    first = tmp_path / segment_name(0)
    with open(first, "r+b") as f:  # flip a byte inside the second batch's records
        f.seek(first.stat().st_size // 2 + 40)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    repaired = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=200))
    assert 0 < repaired.high_watermark < 10
    assert repaired.segment_count == 1  # later segments would leave a gap: removed
    assert len(list(tmp_path.glob("*.log"))) == 1


def test_produced_data_that_is_not_whole_valid_batches_is_refused() -> None:
    batch = make_batch([b"a", b"b"])
    with pytest.raises(InvalidRecordsError) as torn:
        split_batches(batch[:-1], 1 << 20)
    assert torn.value.code is ErrorCode.CORRUPT_MESSAGE
    flipped = bytearray(batch)
    flipped[-1] ^= 1
    with pytest.raises(InvalidRecordsError):
        split_batches(bytes(flipped), 1 << 20)
    with pytest.raises(InvalidRecordsError) as large:
        split_batches(batch, 10)
    assert large.value.code is ErrorCode.MESSAGE_TOO_LARGE
    assert len(split_batches(batch + batch, 1 << 20)) == 2


def test_retention_deletes_whole_old_segments_by_their_newest_timestamp(tmp_path: Path) -> None:
    config = LogConfig(retention_ms=60_000, segment_bytes=300)
    log = PartitionLog.open(tmp_path, config)
    for i in range(20):
        append(log, [b"p" * 40], timestamp_ms=T0 + i * 10_000)  # one record every 10 s
    segments = log.segment_count
    assert segments > 4

    assert log.enforce_retention(now_ms=T0) == 0
    deleted = log.enforce_retention(now_ms=T0 + 120_000)
    assert 0 < deleted < segments
    start = log.log_start_offset
    assert 0 < start <= 7  # records stamped before T0 + 60 s may go, no later one
    assert len(list(tmp_path.glob("*.log"))) == segments - deleted
    with pytest.raises(OffsetOutOfRangeError):
        log.read(start - 1, 100)
    assert records(log.read(start, 1 << 20))[0][0] == start

    # Everything expired: the active segment is rolled first, then all old ones go.
    log.enforce_retention(now_ms=T0 + 10_000_000)
    assert log.segment_count == 1
    assert log.log_start_offset == log.high_watermark == 20
    assert log.read(20, 100) == b""
    assert append(log, [b"new"]) == 20


def test_delete_records_moves_the_log_start_and_survives_reopening(tmp_path: Path) -> None:
    config = LogConfig(retention_ms=-1, segment_bytes=300)
    log = PartitionLog.open(tmp_path, config)
    for i in range(20):
        append(log, [str(i).encode()])
    assert log.delete_records(13) == 13
    assert log.delete_records(5) == 13  # never moves back
    with pytest.raises(OffsetOutOfRangeError):
        log.delete_records(21)
    assert records(log.read(13, 1 << 20))[0][0] <= 13
    log.close()
    again = PartitionLog.open(tmp_path, config)
    assert again.log_start_offset == 13
    with pytest.raises(OffsetOutOfRangeError):
        again.read(12, 100)


def test_the_offset_for_a_timestamp_is_the_first_record_at_or_after_it(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=400))
    for i in range(10):
        append(log, [b"a", b"b", b"c"], timestamp_ms=T0 + i * 1000)  # stamps +0, +1, +2 ms
    assert log.offset_for_timestamp(T0) == (0, T0)
    assert log.offset_for_timestamp(T0 + 4001) == (13, T0 + 4001)
    assert log.offset_for_timestamp(T0 + 4003) == (15, T0 + 5000)
    assert log.offset_for_timestamp(T0 + 99_000) is None


def test_an_idempotent_retry_gets_its_first_offset_and_is_not_written_again(
    tmp_path: Path,
) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    assert append(log, [b"a", b"b"], producer=(7, 0, 0)) == 0
    assert append(log, [b"c"], producer=(7, 0, 2)) == 2
    assert append(log, [b"a", b"b"], producer=(7, 0, 0)) == 0  # the answer was lost: a retry
    assert log.high_watermark == 3
    assert append(log, [b"d"], producer=(7, 0, 3)) == 3
    assert [v for _, v in records(log.read(0, 1 << 20))] == [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize(
    ("producer", "code"),
    [
        pytest.param((7, 0, 5), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, id="gap"),
        pytest.param((7, 0, 1), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, id="overlap"),
        pytest.param((7, 1, 3), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, id="new-epoch-not-0"),
    ],
)
def test_a_batch_out_of_sequence_is_refused(
    tmp_path: Path, producer: tuple[int, int, int], code: ErrorCode
) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    append(log, [b"a", b"b", b"c"], producer=(7, 0, 0))
    with pytest.raises(KafkaApiError) as refused:
        append(log, [b"x"], producer=producer)
    assert refused.value.code == code
    assert log.high_watermark == 3


def test_a_fenced_epoch_is_refused_and_a_new_epoch_starts_at_zero(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    append(log, [b"a"], producer=(7, 0, 0))
    assert append(log, [b"b"], producer=(7, 1, 0)) == 1
    with pytest.raises(KafkaApiError) as refused:
        append(log, [b"c"], producer=(7, 0, 1))
    assert refused.value.code == ErrorCode.INVALID_PRODUCER_EPOCH


def test_sequences_wrap_and_an_unknown_producer_may_start_anywhere(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    top = 2**31 - 1
    assert append(log, [b"a", b"b"], producer=(3, 0, top - 1)) == 0
    assert append(log, [b"c"], producer=(3, 0, 0)) == 2


def test_duplicates_are_still_recognised_after_reopening(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=200))
    for sequence in range(8):
        append(log, [f"v{sequence}".encode()], producer=(9, 0, sequence))
    log.close()
    again = PartitionLog.open(tmp_path, LogConfig(retention_ms=-1, segment_bytes=200))
    assert again.segment_count > 1
    assert append(again, [b"v7"], producer=(9, 0, 7)) == 7
    assert append(again, [b"v3"], producer=(9, 0, 3)) == 3  # one of the last five
    assert again.high_watermark == 8
    with pytest.raises(KafkaApiError):
        append(again, [b"v2"], producer=(9, 0, 2))  # older than the last five: out of order
    assert append(again, [b"v8"], producer=(9, 0, 8)) == 8


def test_a_producer_id_without_epoch_or_sequence_is_an_invalid_record(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    with pytest.raises(KafkaApiError) as refused:
        append(log, [b"a"], producer=(4, -1, -1))
    assert refused.value.code == ErrorCode.INVALID_RECORD


def test_an_idempotent_request_holds_one_batch_per_partition(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, BIG)
    data = make_batch([b"a"], producer=(1, 0, 0)) + make_batch([b"b"], producer=(1, 0, 1))
    with pytest.raises(KafkaApiError) as refused:
        log.append(data, split_batches(data, 1 << 20))
    assert refused.value.code == ErrorCode.INVALID_RECORD
