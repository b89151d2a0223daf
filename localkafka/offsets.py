"""Committed consumer-group offsets, kept in memory and in an append-only file.

``<data dir>/consumer-offsets.log`` is a sequence of frames ``length uint32 | crc32c uint32
| payload``, the payload a JSON array ``[group, topic, partition, offset, metadata]`` (offset
``null``: the commit was removed, as when its topic is deleted). At open the frames are read
up to the first torn or corrupt one, the latest per key wins, and the file is rewritten
with only those (atomically); while running it is rewritten the same way once it holds
many more frames than live commits. A commit is written to the file (page cache) before it
is acknowledged, so it survives the broker being killed; fsync follows on the interval.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from aiokafka.record.util import calc_crc32c

from localkafka.fsutil import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "consumer-offsets.log"
_FRAME = struct.Struct(">II")
_COMPACT_MIN_FRAMES = 10_000

TopicPartition = tuple[str, int]


class CommittedOffset(NamedTuple):
    offset: int
    metadata: str


def _frame(group: str, topic: str, partition: int, commit: CommittedOffset | None) -> bytes:
    fields: list[Any] = [group, topic, partition, None, ""]
    if commit is not None:
        fields[3:] = [commit.offset, commit.metadata]
    payload = json.dumps(fields, separators=(",", ":")).encode()
    return _FRAME.pack(len(payload), calc_crc32c(payload)) + payload


class OffsetStore:
    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / FILE_NAME
        self._groups: dict[str, dict[TopicPartition, CommittedOffset]] = {}
        self._fd = -1
        self._frames = 0
        self._dirty = False

    def open(self) -> None:
        data = self._path.read_bytes() if self._path.exists() else b""
        pos = 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            payload = data[pos + _FRAME.size : pos + _FRAME.size + length]
            if len(payload) != length or calc_crc32c(payload) != crc:
                break
            group, topic, partition, offset, metadata = json.loads(payload)
            commits = self._groups.setdefault(group, {})
            if offset is None:
                commits.pop((topic, partition), None)
            else:
                commits[(topic, partition)] = CommittedOffset(offset, metadata)
            pos += _FRAME.size + length
        if pos < len(data):
            log.warning("%s: dropped %d bytes of torn or corrupt tail", self._path, len(data) - pos)
        self._rewrite()
        log.info("loaded committed offsets of %d group(s)", len(self._groups))

    def _rewrite(self) -> None:
        """Replaces the file with one frame per live commit and reopens it for appends."""
        frames = [
            _frame(group, topic, partition, commit)
            for group, commits in self._groups.items()
            for (topic, partition), commit in commits.items()
        ]
        write_atomic(self._path, b"".join(frames))
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        self._frames = len(frames)

    def _append(self, frames: list[bytes]) -> None:
        view = memoryview(b"".join(frames))
        while view:
            view = view[os.write(self._fd, view) :]
        self._frames += len(frames)
        self._dirty = True
        live = sum(len(c) for c in self._groups.values())
        if self._frames > max(_COMPACT_MIN_FRAMES, 4 * live):
            self._rewrite()

    def commit(self, group: str, commits: Mapping[TopicPartition, CommittedOffset]) -> None:
        """Records the commits (written before this returns: acknowledged means kept)."""
        if not commits:
            return
        frames = [_frame(group, t, p, c) for (t, p), c in commits.items()]
        self._groups.setdefault(group, {}).update(commits)
        self._append(frames)  # after the update: a compaction in it rewrites from memory

    def get(self, group: str, topic: str, partition: int) -> CommittedOffset | None:
        return self._groups.get(group, {}).get((topic, partition))

    def group(self, group: str) -> Mapping[TopicPartition, CommittedOffset]:
        return self._groups.get(group, {})

    def group_ids(self) -> list[str]:
        """The groups that hold committed offsets."""
        return [group for group, commits in self._groups.items() if commits]

    def delete_topic(self, topic: str) -> None:
        frames = []
        for group, commits in self._groups.items():
            for key in [k for k in commits if k[0] == topic]:
                del commits[key]
                frames.append(_frame(group, key[0], key[1], None))
        if frames:
            self._append(frames)

    def dup_if_dirty(self) -> int | None:
        if not self._dirty or self._fd < 0:
            return None
        self._dirty = False
        return os.dup(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
