"""The log of one topic-partition: a directory of segments, a log start offset, and waiters.

Offsets run contiguously from the log start offset to the high watermark; every append is
committed at once and wakes the fetches waiting on the log. Retention and DeleteRecords
delete whole segments only, and a log always has an active segment. A read costs two
bisections and one pread, whatever the length of the log. Each operation's contract is on
its method; what clients see: docs/kafka-apis.md.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from localkafka.errors import ErrorCode, KafkaApiError, OffsetOutOfRangeError
from localkafka.fsutil import write_atomic
from localkafka.producers import ProducerState
from localkafka.records import BatchInfo, assign_offsets
from localkafka.segment import SUFFIX, Segment

log = logging.getLogger(__name__)

LOG_START_FILE = "log-start-offset"


@dataclass(frozen=True)
class LogConfig:
    retention_ms: int
    """Age (ms) past which a whole segment is deleted, judged by its newest timestamp; -1 keeps
    everything."""
    segment_bytes: int
    """Size (bytes) at which the active segment is closed and a new one started."""


class PartitionLog:
    def __init__(
        self,
        directory: Path,
        config: LogConfig,
        segments: list[Segment],
        start: int,
        producers: ProducerState,
    ):
        self.directory = directory
        self.config = config
        self._segments = segments
        self._bases = [s.base_offset for s in segments]
        self._log_start = start
        self._producers = producers
        self._waiters: set[asyncio.Future[None]] = set()

    @classmethod
    def open(cls, directory: Path, config: LogConfig) -> PartitionLog:
        """Opens (or creates) the log in ``directory``, repairing a torn tail."""
        directory.mkdir(parents=True, exist_ok=True)
        segments: list[Segment] = []
        producers = ProducerState()
        for path in sorted(directory.glob(f"*{SUFFIX}")):
            if not path.stem.isdigit():
                log.warning("%s: not a segment name, ignored", path)
                continue
            if segments and segments[-1].next_offset != int(path.stem):
                # An earlier segment lost its tail: what follows would leave a gap.
                log.warning("%s: follows a truncated segment, deleted", path)
                path.unlink()
                continue
            segment, batches = Segment.open(path, int(path.stem))
            segments.append(segment)
            offset = segment.base_offset
            for batch in batches:
                producers.record(batch, offset)
                offset += batch.record_count
        start_file = directory / LOG_START_FILE
        stored = int(start_file.read_text()) if start_file.exists() else 0
        if not segments:
            segments.append(Segment.create(directory, stored))
        start = min(max(stored, segments[0].base_offset), segments[-1].next_offset)
        return cls(directory, config, segments, start, producers)

    @property
    def log_start_offset(self) -> int:
        return self._log_start

    @property
    def high_watermark(self) -> int:
        """The offset the next appended record gets (every append is committed at once)."""
        return self._segments[-1].next_offset

    @property
    def highest_producer_id(self) -> int:
        """The highest idempotent producer id in the log; -1 when none."""
        return self._producers.highest_id()

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def append(self, data: bytes, batches: list[BatchInfo]) -> int:
        """Appends validated batches; returns the offset given to the first record.

        The batches are numbered from the high watermark and written to the active segment,
        rolled first when it would pass ``segment_bytes``. A batch from an idempotent
        producer is checked against ``localkafka.producers`` first: a duplicate is answered
        with its first offset and not written again.
        """
        if any(batch.producer_id >= 0 for batch in batches):
            if len(batches) > 1:
                raise KafkaApiError(
                    ErrorCode.INVALID_RECORD,
                    "an idempotent producer sends one record batch per partition",
                )
            duplicate_of = self._producers.check(batches[0])
            if duplicate_of is not None:
                return duplicate_of
        active = self._segments[-1]
        if active.size > 0 and active.size + len(data) > self.config.segment_bytes:
            active = self._roll()
        base = active.next_offset
        active.append(assign_offsets(data, batches, base), batches)
        offset = base
        for batch in batches:
            self._producers.record(batch, offset)
            offset += batch.record_count
        self._wake()
        return base

    def _roll(self) -> Segment:
        segment = Segment.create(self.directory, self.high_watermark)
        self._segments.append(segment)
        self._bases.append(segment.base_offset)
        log.debug("%s: rolled a new segment at offset %d", self.directory, segment.base_offset)
        return segment

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding ``offset``, from one segment, at least one
        whatever ``max_bytes``; ``b""`` at the high watermark; ``OffsetOutOfRangeError``
        outside ``[log_start_offset, high_watermark]``."""
        if offset < self._log_start or offset > self.high_watermark:
            raise OffsetOutOfRangeError(offset, self._log_start, self.high_watermark)
        if offset == self.high_watermark:
            return b""
        segment = self._segments[bisect_right(self._bases, offset) - 1]
        return segment.read(offset, max_bytes)

    def offset_for_timestamp(self, timestamp: int) -> tuple[int, int] | None:
        """(offset, timestamp) of the first record stamped at or after ``timestamp``."""
        for segment in self._segments:
            if segment.max_timestamp >= timestamp:
                found = segment.find_timestamp(timestamp)
                if found is not None:
                    return max(found[0], self._log_start), found[1]
        return None

    def delete_records(self, offset: int) -> int:
        """Moves the log start offset up to ``offset`` (-1: the high watermark), persisted in
        ``log-start-offset``, and deletes the whole segments below it; returns the offset."""
        if offset == -1:
            offset = self.high_watermark
        if offset < 0 or offset > self.high_watermark:
            raise OffsetOutOfRangeError(offset, self._log_start, self.high_watermark)
        if offset > self._log_start:
            write_atomic(self.directory / LOG_START_FILE, str(offset).encode())
            self._log_start = offset
            whole = 0
            while whole < len(self._segments) - 1 and self._segments[whole].next_offset <= offset:
                whole += 1
            self._delete_oldest(whole)
        return self._log_start

    def enforce_retention(self, now_ms: int) -> int:
        """Deletes the oldest whole segments whose newest timestamp is older than
        ``retention_ms``; returns how many. When that is every segment, a new empty one is
        rolled first, so the log keeps an active segment."""
        if self.config.retention_ms < 0:
            return 0
        cutoff = now_ms - self.config.retention_ms
        expired = 0
        for segment in self._segments:
            if segment.size == 0 or segment.max_timestamp >= cutoff:
                break
            expired += 1
        if expired == len(self._segments):
            self._roll()
        self._delete_oldest(expired)
        return expired

    def _delete_oldest(self, count: int) -> None:
        if count <= 0:
            return
        for segment in self._segments[:count]:
            segment.delete()
        del self._segments[:count]
        del self._bases[:count]
        self._log_start = max(self._log_start, self._segments[0].base_offset)
        log.info(
            "%s: deleted %d segment(s); log start offset now %d",
            self.directory,
            count,
            self._log_start,
        )

    def add_waiter(self, waiter: asyncio.Future[None]) -> None:
        """``waiter`` gets a result at the next append (or when the log closes)."""
        self._waiters.add(waiter)

    def discard_waiter(self, waiter: asyncio.Future[None]) -> None:
        self._waiters.discard(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def dup_dirty(self) -> list[int]:
        """Duplicated descriptors of the segments written since the last call, to fsync."""
        return [fd for s in self._segments if (fd := s.dup_if_dirty()) is not None]

    def fsync(self) -> None:
        for segment in self._segments:
            segment.fsync()

    def close(self) -> None:
        self._wake()
        for segment in self._segments:
            segment.close()
