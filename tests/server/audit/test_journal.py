"""The journal on its own: framing, rotation, torn tails, one writer per folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.audit.journal import (
    HEADER,
    MAGIC,
    Journal,
    JournalLocked,
    JournalWriteError,
    frame,
    parse_frames,
    segment_path,
    segments,
)
from tests.conftest import REPO


def open_journal(directory, **kw) -> Journal:
    journal = Journal(
        directory,
        segment_max_bytes=kw.get("segment_max_bytes", 1 << 20),
        fsync_interval_ms=kw.get("fsync_interval_ms", 50.0),
    )
    journal.open()
    return journal


def all_records(directory) -> list[bytes]:
    """Every valid record of every segment, in order (each stops at a torn tail)."""
    records: list[bytes] = []
    for segment in segments(directory):
        data = segment_path(directory, segment).read_bytes()
        if data.startswith(MAGIC):
            records.extend(parse_frames(memoryview(data)[len(MAGIC) :]).payloads)
    return records


def test_appended_records_read_back_in_order(tmp_path):
    journal = open_journal(tmp_path)
    journal.append([b"one"])
    journal.append([b"two", b"three"])
    journal.close()
    assert all_records(tmp_path) == [b"one", b"two", b"three"]


def test_position_is_the_end_of_the_last_complete_record(tmp_path):
    journal = open_journal(tmp_path)
    start = journal.position
    journal.append([b"abc"])
    assert journal.position.segment == start.segment
    assert journal.position.offset == start.offset + HEADER.size + 3
    assert segment_path(tmp_path, start.segment).stat().st_size == journal.position.offset
    journal.close()


def test_segments_rotate_at_the_size_limit(tmp_path):
    journal = open_journal(tmp_path, segment_max_bytes=64 << 10)
    payloads = [os.urandom(1000) for _ in range(200)]
    for payload in payloads:
        journal.append([payload])
    journal.close()
    assert len(segments(tmp_path)) >= 3
    assert all_records(tmp_path) == payloads


@pytest.mark.parametrize("sync_ms", [0.0, 5.0])
def test_a_torn_final_record_is_cut_and_earlier_records_are_kept(tmp_path, sync_ms):
    journal = open_journal(tmp_path, fsync_interval_ms=sync_ms)
    journal.append([b"first", b"second"])
    torn_segment = journal.position.segment
    journal.close()
    path = segment_path(tmp_path, torn_segment)
    whole = frame([b"third record, torn by a crash"])
    with path.open("ab") as file:
        file.write(whole[:-7])  # the process died in the middle of the write
    size_before = path.stat().st_size

    reopened = open_journal(tmp_path)
    reopened.append([b"after restart"])
    reopened.close()

    assert path.stat().st_size == size_before - (len(whole) - 7)
    assert all_records(tmp_path) == [b"first", b"second", b"after restart"]
    assert reopened.position.segment == torn_segment + 1  # never appends to an old file


def test_a_record_with_a_bad_checksum_ends_the_valid_part(tmp_path):
    journal = open_journal(tmp_path)
    journal.append([b"good", b"flipped"])
    segment = journal.position.segment
    journal.close()
    path = segment_path(tmp_path, segment)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    parsed = parse_frames(memoryview(bytes(data))[len(MAGIC) :])
    assert parsed.payloads == [b"good"]
    assert parsed.problem == "checksum mismatch"
    open_journal(tmp_path).close()  # repairs
    assert all_records(tmp_path) == [b"good"]


def test_a_second_writer_on_the_same_folder_is_refused(tmp_path):
    journal = open_journal(tmp_path)
    try:
        with pytest.raises(JournalLocked, match="in use"):
            open_journal(tmp_path)
    finally:
        journal.close()
    open_journal(tmp_path).close()  # free again once closed


def test_append_after_close_fails_clearly(tmp_path):
    journal = open_journal(tmp_path)
    journal.close()
    journal.close()  # idempotent
    with pytest.raises(JournalWriteError, match="closed"):
        journal.append([b"late"])


def test_a_failed_write_keeps_none_of_its_records(tmp_path):
    # A file-size limit makes the OS take part of the write, then refuse the rest (as a
    # full disk does); in a child process, so the limit touches nothing else.
    script = f"""
import resource, signal
from pathlib import Path
from server.audit.journal import Journal, JournalWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
journal = Journal(Path({str(tmp_path)!r}), segment_max_bytes=1 << 20, fsync_interval_ms=0)
journal.open()
journal.append([b"kept"])
size = journal.position.offset
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
try:
    journal.append([b"x" * 1000])
except JournalWriteError:
    print("refused")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
journal.append([b"next"])
journal.close()
print(journal.write_failures)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.split() == ["refused", "1"], done.stderr
    assert all_records(tmp_path) == [b"kept", b"next"]


def test_a_failed_rotation_keeps_appending_to_the_current_segment(tmp_path):
    # Out of file descriptors: the next segment cannot be created (a real OS refusal).
    script = f"""
import resource
from pathlib import Path
from server.audit.journal import Journal
journal = Journal(Path({str(tmp_path)!r}), segment_max_bytes=64 << 10, fsync_interval_ms=0)
journal.open()
first = journal.position.segment
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
import os
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
for n in range(100):
    journal.append([b"%04d" % n + b"x" * 1000])  # past the segment size: rotation fails
stuck = journal.position.segment
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
journal.append([b"after"])
journal.close()
print(first == stuck, journal.position.segment > stuck)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.split() == ["True", "True"], done.stderr
    records = all_records(tmp_path)
    assert len(records) == 101 and records[-1] == b"after"
    assert "cannot start a new segment" in done.stderr


def test_zeros_after_the_last_record_are_not_records(tmp_path):
    parsed = parse_frames(frame([b"real"]) + bytes(64))
    assert parsed.payloads == [b"real"]
    assert parsed.problem == "empty record"
    with pytest.raises(ValueError, match="empty"):
        journal = open_journal(tmp_path)
        try:
            journal.append([b""])
        finally:
            journal.close()
