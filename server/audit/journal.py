"""The audit journal: append-only segment files of length-prefixed, checksummed records.

``append`` hands the records to the OS before it returns, so an answered decision
survives the process being killed; a sync thread ``fdatasync``s every
``fsync_interval_ms`` for machine crashes (0: every append, in the caller). ``open`` cuts
a torn tail and begins a new segment, so records are only ever appended to a file this
process created; one process owns a directory (an exclusive ``flock``). The audit trail:
docs/audit.md.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# A segment ``<seq>.seg`` is MAGIC followed by records, each
# ``<u32 payload length><u32 crc32 of the payload><payload>`` (little-endian).
MAGIC = b"DJNL\x00\x01\r\n"
HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 20
SEGMENT_SUFFIX = ".seg"
# A segment is closed at this size: large enough that rotation is rare, small enough that
# a shipped segment is deleted soon.
SEGMENT_MAX_BYTES = 64 << 20
# A write to the page cache takes microseconds; one this slow stalled every decision.
SLOW_WRITE_S = 0.02


class JournalError(Exception):
    pass


class JournalLocked(JournalError):
    """Another process has the journal directory open."""


class JournalWriteError(JournalError):
    """The records could not be handed to the OS (disk full, I/O error); none were kept."""


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in the journal: a segment and a byte offset within it."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class Frames:
    """Payloads parsed from a byte range, and where parsing stopped."""

    payloads: list[bytes]
    consumed: int  # bytes of complete, valid records
    problem: str | None  # why parsing stopped before the end, if it did


def frame(payloads: Sequence[bytes]) -> bytes:
    return b"".join(HEADER.pack(len(p), zlib.crc32(p)) + p for p in payloads)


def parse_frames(data: bytes | memoryview, max_records: int | None = None) -> Frames:
    """Valid records from the start of ``data``; stops at the first incomplete or bad one."""
    view = memoryview(data)
    payloads: list[bytes] = []
    offset = 0
    end = len(view)
    problem = None
    while offset < end and (max_records is None or len(payloads) < max_records):
        if end - offset < HEADER.size:
            problem = "incomplete record header"
            break
        length, checksum = HEADER.unpack_from(view, offset)
        if length == 0:
            # Never written (append refuses empty payloads): zeros left by a crash.
            problem = "empty record"
            break
        if length > MAX_RECORD_BYTES:
            problem = f"record length {length} is not plausible"
            break
        start = offset + HEADER.size
        if end - start < length:
            problem = "incomplete record"
            break
        payload = bytes(view[start : start + length])
        if zlib.crc32(payload) != checksum:
            problem = "checksum mismatch"
            break
        payloads.append(payload)
        offset = start + length
    return Frames(payloads, offset, problem)


def segment_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:020d}{SEGMENT_SUFFIX}"


def segments(directory: Path) -> list[int]:
    """The segment numbers present, oldest first."""
    found = []
    for path in directory.glob(f"*{SEGMENT_SUFFIX}"):
        with contextlib.suppress(ValueError):
            found.append(int(path.name.removesuffix(SEGMENT_SUFFIX)))
    return sorted(found)


def read_range(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as file:
        file.seek(start)
        return file.read(max(0, end - start))


class Journal:
    """The writer. ``append`` runs on the caller's thread; a daemon thread syncs."""

    def __init__(
        self, directory: Path, *, segment_max_bytes: int, fsync_interval_ms: float
    ) -> None:
        self.directory = directory
        self._segment_max_bytes = segment_max_bytes
        self._fsync_interval_s = fsync_interval_ms / 1000.0
        self._lock_fd = -1
        self._fd = -1
        self._segment = 0
        self._end = 0
        self._position = Position(0, 0)
        self._synced_end = Position(0, 0)
        self._retired: collections.deque[int] = collections.deque()
        self._closing = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.appended_records = 0
        self.write_failures = 0
        self._needs_new_segment = False
        self._rotation_failing = False

    @property
    def position(self) -> Position:
        """The end of the last complete record (safe to read up to from another thread)."""
        return self._position

    def open(self) -> None:
        """Locks the directory, repairs a torn tail, and begins a new segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JournalLocked(f"journal {self.directory} is in use by another process") from None
        existing = segments(self.directory)
        if existing:
            self._repair(existing[-1])
        self._begin_segment((existing[-1] if existing else 0) + 1)
        if self._fsync_interval_s > 0:
            self._sync_thread = threading.Thread(
                target=self._sync_loop, name="audit-journal-sync", daemon=True
            )
            self._sync_thread.start()

    def _repair(self, segment: int) -> None:
        path = segment_path(self.directory, segment)
        data = path.read_bytes()
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            log.warning("audit journal: removing segment %s torn at creation", path.name)
            path.unlink()
            return
        if not data.startswith(MAGIC):
            raise JournalError(f"{path} is not an audit journal segment")
        frames = parse_frames(memoryview(data)[len(MAGIC) :])
        good_end = len(MAGIC) + frames.consumed
        if good_end < len(data):
            log.warning(
                "audit journal: %s ends in a torn record (%s) at offset %d; cut %d bytes, "
                "kept %d records before it",
                path.name,
                frames.problem,
                good_end,
                len(data) - good_end,
                len(frames.payloads),
            )
            with path.open("r+b") as file:
                file.truncate(good_end)
                os.fsync(file.fileno())

    def _begin_segment(self, segment: int) -> None:
        """Creates the next segment; on failure nothing changes and no file is left."""
        path = segment_path(self.directory, segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if os.write(fd, MAGIC) != len(MAGIC):
                raise OSError("short write of the segment header")
            self._fsync_directory()
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._segment, self._end = fd, segment, len(MAGIC)
        self._position = Position(segment, self._end)

    def _fsync_directory(self) -> None:
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def append(self, payloads: Sequence[bytes]) -> None:
        """Hands the records to the OS in one write; all or none of them are kept."""
        if self._fd < 0:
            raise JournalWriteError("the audit journal is closed")
        if not all(payloads):
            raise ValueError("an audit record cannot be empty")
        if self._needs_new_segment:
            # A partial write could not be cut from the current segment: never write
            # after it (the records would be misframed), start afresh or refuse.
            try:
                self._rotate()
            except OSError as exc:
                self.write_failures += 1
                raise JournalWriteError(f"audit journal unusable: {exc}") from exc
            self._needs_new_segment = False
        data = frame(payloads)
        view = memoryview(data)
        written = 0
        started = time.perf_counter()
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            self.write_failures += 1
            self._discard_partial_write()
            raise JournalWriteError(f"audit journal write failed: {exc}") from exc
        took_s = time.perf_counter() - started
        if took_s > SLOW_WRITE_S:  # the write runs on the event loop: every call waited
            log.warning("audit journal write took %.0f ms (the kernel held it)", took_s * 1e3)
        self._end += len(data)
        self._position = Position(self._segment, self._end)
        self.appended_records += len(payloads)
        if self._fsync_interval_s == 0:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                # The records are in the file and will be shipped; the decision is not
                # returned, since its durability was not what was asked.
                self.write_failures += 1
                raise JournalWriteError(f"audit journal fsync failed: {exc}") from exc
            self._synced_end = self._position
        if self._end >= self._segment_max_bytes:
            try:
                self._rotate()
                self._rotation_failing = False
            except OSError:
                # The records are written; the segment grows past its size until a
                # later append manages to rotate.
                if not self._rotation_failing:
                    log.exception("audit journal: cannot start a new segment; will retry")
                self._rotation_failing = True

    def _discard_partial_write(self) -> None:
        """Cuts a partly written record; if that fails, the next append needs a new segment
        (the torn tail stays at the end of this one, where the shipper stops reading)."""
        try:
            os.ftruncate(self._fd, self._end)
            os.lseek(self._fd, self._end, os.SEEK_SET)
        except OSError:
            log.exception("audit journal: could not cut a partial write")
            self._needs_new_segment = True

    def _rotate(self) -> None:
        old = self._fd
        self._begin_segment(self._segment + 1)
        if self._sync_thread is None:
            os.fdatasync(old)
            os.close(old)
        else:
            self._retired.append(old)

    def sync(self) -> None:
        """Syncs retired segments and the active one up to the current position."""
        while self._retired:
            fd = self._retired.popleft()
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        position = self._position
        fd = self._fd
        if fd >= 0 and position > self._synced_end:
            os.fdatasync(fd)
            self._synced_end = position

    def _sync_loop(self) -> None:
        while not self._closing.wait(self._fsync_interval_s):
            try:
                self.sync()
            except OSError:
                log.exception("audit journal: fsync failed")

    def close(self) -> None:
        """Idempotent: stops the sync thread, syncs everything and releases the lock."""
        if self._lock_fd < 0:
            return
        self._closing.set()
        if self._sync_thread is not None:
            self._sync_thread.join()
            self._sync_thread = None
        try:
            self.sync()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            os.close(self._lock_fd)
            self._lock_fd = -1
