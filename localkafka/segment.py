"""One segment file of a partition's log and its in-memory index.

A segment named ``<base offset, 20 digits>.log`` holds contiguous v2 record batches, the
first starting at its base offset. The index keeps, per batch, its base offset, its file
position and the highest timestamp seen up to it (a running maximum, so it is sorted), in
``array`` columns: finding the batch that holds an offset, or the first batch that may hold
a timestamp, is a bisection whatever the segment's length.

Appends go straight to the file (the page cache) with ``os.write``; reads are ``os.pread``
of whole batches. ``fsync`` happens only when the owner asks (``dup_if_dirty``).
"""

from __future__ import annotations

import logging
import os
from array import array
from bisect import bisect_left, bisect_right
from pathlib import Path

from localkafka.records import BatchInfo, first_at_or_after, valid_prefix

log = logging.getLogger(__name__)

SUFFIX = ".log"


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}{SUFFIX}"


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Segment:
    """Batches from ``base_offset`` up to ``next_offset`` (exclusive) in one file."""

    def __init__(self, path: Path, base_offset: int, fd: int) -> None:
        self.path = path
        self.base_offset = base_offset
        self.next_offset = base_offset
        self.size = 0
        self._fd = fd
        self._dirty = False
        self._offsets = array("q")
        self._positions = array("q")
        self._running_max_ts = array("q")

    @classmethod
    def create(cls, directory: Path, base_offset: int) -> Segment:
        path = directory / segment_name(base_offset)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        return cls(path, base_offset, fd)

    @classmethod
    def open(cls, path: Path, base_offset: int) -> tuple[Segment, list[BatchInfo]]:
        """Opens an existing segment, rebuilding its index; a torn or corrupt tail is cut off.

        Returns it with the batches it holds."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            batches, valid = valid_prefix(data, base_offset)
            if valid < len(data):
                log.warning(
                    "%s: truncating %d bytes after offset %d (torn or corrupt tail)",
                    path,
                    len(data) - valid,
                    base_offset + sum(b.record_count for b in batches),
                )
                os.ftruncate(fd, valid)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        segment = cls(path, base_offset, fd)
        segment._index(batches, base_offset, 0)
        segment.size = valid
        return segment, batches

    @property
    def batch_count(self) -> int:
        return len(self._offsets)

    @property
    def max_timestamp(self) -> int:
        """The highest record timestamp in the segment (ms), -1 when it has none."""
        return self._running_max_ts[-1] if self._running_max_ts else -1

    def _index(self, batches: list[BatchInfo], base_offset: int, file_position: int) -> None:
        offset = base_offset
        running = self.max_timestamp
        for info in batches:
            running = max(running, info.max_timestamp)
            self._offsets.append(offset)
            self._positions.append(file_position + info.position)
            self._running_max_ts.append(running)
            offset += info.record_count
        self.next_offset = offset

    def append(self, data: bytes | bytearray, batches: list[BatchInfo]) -> None:
        """Appends batches already numbered from ``next_offset``; all or nothing."""
        start = self.size
        try:
            _write_all(self._fd, data)
        except OSError:
            os.ftruncate(self._fd, start)
            raise
        self._index(batches, self.next_offset, start)
        self.size = start + len(data)
        self._dirty = True

    def _batch_index(self, offset: int) -> int:
        return bisect_right(self._offsets, offset) - 1

    def _batch_end(self, index: int) -> int:
        return self._positions[index + 1] if index + 1 < len(self._positions) else self.size

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding ``offset`` (which must lie in this segment), up
        to ``max_bytes`` in all but always at least that first batch."""
        first = self._batch_index(offset)
        start = self._positions[first]
        limit = start + max_bytes
        if self.size <= limit:
            end = self.size
        else:
            last_boundary = bisect_right(self._positions, limit) - 1
            end = (
                self._positions[last_boundary] if last_boundary > first else self._batch_end(first)
            )
        return os.pread(self._fd, end - start, start)

    def find_timestamp(self, timestamp: int) -> tuple[int, int] | None:
        """(offset, timestamp) of the first record stamped at or after ``timestamp``, if any."""
        index = bisect_left(self._running_max_ts, timestamp)
        if index == len(self._running_max_ts):
            return None
        start = self._positions[index]
        return first_at_or_after(
            os.pread(self._fd, self._batch_end(index) - start, start), timestamp
        )

    def dup_if_dirty(self) -> int | None:
        """A duplicate of the file descriptor to fsync (the caller closes it), if written to
        since the last call. A duplicate stays valid if the segment is deleted meanwhile."""
        if not self._dirty:
            return None
        self._dirty = False
        return os.dup(self._fd)

    def fsync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def delete(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
