"""Ships an audit journal folder into the SQL store, a batch at a time.

``BatchShipper`` reads from its checkpoint (a small file beside the segments) up to the
last complete record, inserts a batch in one transaction, then moves the checkpoint and
deletes the segments it has passed. Inserts are idempotent, so a crash between the
insert and the checkpoint only re-ships a batch. A corrupt record in a closed segment (a
torn write that was never repaired) is logged and the rest of that segment skipped:
nothing before it is lost. It never waits and never retries: ``AuditShipper``
(``server.audit.ship_thread``) runs it on a thread, in a process of its own beside the
server (``server.audit.ship_process``). The functions on a folder (``unshipped_bytes``,
``over_cap``) let the server measure the backlog without a shipper.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy.exc

from server.audit.journal import (
    MAGIC,
    Position,
    parse_frames,
    read_range,
    segment_path,
    segments,
)
from server.audit.record import decode
from server.audit.store import AuditStore

log = logging.getLogger(__name__)

REJECTED_FILE = "rejected.jsonl"
# Errors that are about the rows, not the database being away: retrying cannot help.
ROW_ERRORS = (sqlalchemy.exc.DataError, sqlalchemy.exc.IntegrityError)
# Room for a full batch: a decision record is about 1.2 KiB.
READ_CHUNK_BYTES = 16 << 20
CHECKPOINT_FILE = "shipped"


@dataclass(frozen=True, slots=True)
class ShipperStatus:
    store_ok: bool  # the last attempt to reach the store succeeded
    last_error: str
    backlog_bytes: int  # journal bytes not yet in the store
    full: bool  # the backlog reached its cap: new decisions are refused
    shipped_records: int  # since this process started
    skipped_records: int  # unreadable records passed over (logged)
    rejected_records: int  # records the store refused, kept in rejected.jsonl (logged)
    last_shipped_at_us: int  # wall clock of the last successful insert, 0 if none


def describe(exc: BaseException) -> str:
    """The error in one line, without the statement or its parameters (audit data)."""
    cause = getattr(exc, "orig", None) or exc
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first_line}"[:300]


def read_checkpoint(directory: Path) -> Position | None:
    """Where shipping of a journal folder stopped; None when it never started (or the
    checkpoint is unreadable: then everything is shipped again, logged)."""
    path = directory / CHECKPOINT_FILE
    try:
        saved = orjson.loads(path.read_bytes())
        return Position(int(saved["segment"]), int(saved["offset"]))
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.error("audit journal: unreadable checkpoint %s; shipping from the start", path)
        return None


def unshipped_bytes(directory: Path, checkpoint: Position | None = None) -> int:
    """Journal bytes of a folder past ``checkpoint`` (default: the one saved there)."""
    present = segments(directory)
    if not present:
        return 0
    checkpoint = checkpoint or read_checkpoint(directory) or Position(present[0], len(MAGIC))
    total = 0
    for segment in present:
        if segment < checkpoint.segment:
            continue
        try:
            end = segment_path(directory, segment).stat().st_size
        except FileNotFoundError:
            continue
        start = checkpoint.offset if segment == checkpoint.segment else len(MAGIC)
        total += max(0, end - start)
    return total


def over_cap(backlog_bytes: int, max_backlog_bytes: int) -> bool:
    """Whether a backlog refuses new decisions (a cap of 0: never)."""
    return 0 < max_backlog_bytes <= backlog_bytes


class BatchShipper:
    """Ships one journal folder a batch per ``ship_once`` and keeps its checkpoint and
    counts; ``resume`` first, to take up where the folder's last shipper stopped."""

    def __init__(
        self,
        directory: Path,
        store: AuditStore,
        *,
        written: Callable[[], Position | None],
        batch_records: int,
    ) -> None:
        """``written``: the end of the last record the folder's writer wrote whole (read
        up to there and no further: past it a write may be in progress or being cut
        back); None when no process writes the folder (its complete records are all)."""
        self._directory = directory
        self._written = written
        self._store = store
        self._batch_records = batch_records
        self._checkpoint = Position(0, 0)
        # Since this shipper started, as ShipperStatus reports them.
        self.shipped = 0
        self.skipped = 0
        self.rejected = 0
        self.last_shipped_at_us = 0

    def resume(self) -> None:
        """Reads the folder's checkpoint; with none, ships from its oldest segment."""
        saved = read_checkpoint(self._directory)
        if saved is None:
            present = segments(self._directory)
            saved = Position(present[0] if present else 0, len(MAGIC))
        self._checkpoint = saved

    def backlog_bytes(self) -> int:
        return unshipped_bytes(self._directory, self._checkpoint)

    def reached_the_end(self, shipped: int) -> bool:
        """Whether the last batch took all the journal held when it was read: short of a
        full batch and in the segment being written (a short batch at the end of an older
        segment has more behind it)."""
        last = self._last(self._written())
        return shipped < self._batch_records and self._checkpoint.segment >= last

    def _last(self, written: Position | None) -> int:
        """The segment being written: the writer's (``written``), or with none the newest
        present."""
        if written is not None:
            return written.segment
        present = segments(self._directory)
        return present[-1] if present else self._checkpoint.segment

    def ship_once(self) -> int:
        """Ships one batch; returns how many records it passed (0: caught up)."""
        while True:
            checkpoint = self._checkpoint
            written = self._written()
            last = self._last(written)
            if checkpoint.segment > last:
                return 0
            path = segment_path(self._directory, checkpoint.segment)
            if written is not None and checkpoint.segment == written.segment:
                end = written.offset
            else:
                try:
                    end = path.stat().st_size
                except FileNotFoundError:
                    if checkpoint.segment == last:
                        return 0
                    self._advance_to_next_segment(checkpoint.segment)
                    continue
            if checkpoint.offset >= end:
                if checkpoint.segment == last:
                    return 0
                self._advance_to_next_segment(checkpoint.segment)
                continue
            data = read_range(
                path, checkpoint.offset, min(end, checkpoint.offset + READ_CHUNK_BYTES)
            )
            frames = parse_frames(data, self._batch_records)
            if not frames.payloads:
                if checkpoint.segment == last and written is None:
                    # No writer, and the last record torn: its server died writing it.
                    # The next server's repair cuts it; nothing whole comes after it.
                    return 0
                log.error(
                    "audit journal: %s has an unreadable record at offset %d (%s); skipping "
                    "the rest of that segment",
                    path.name,
                    checkpoint.offset,
                    frames.problem,
                )
                self.skipped += 1
                if checkpoint.segment == last:
                    self._save_checkpoint(Position(checkpoint.segment, end))
                    return 0
                self._advance_to_next_segment(checkpoint.segment)
                continue
            records = self._decode(frames.payloads, path.name)
            if records:
                try:
                    self._store.insert(records)
                except ROW_ERRORS:
                    self._insert_one_by_one(records)
            self.shipped += len(records)
            self.last_shipped_at_us = time.time_ns() // 1000
            self._save_checkpoint(Position(checkpoint.segment, checkpoint.offset + frames.consumed))
            return len(frames.payloads)

    def _insert_one_by_one(self, records: list[dict[str, Any]]) -> None:
        """A batch the store refused for its rows: each record alone; those refused again
        are set aside in ``rejected.jsonl`` (never dropped, never blocking the rest)."""
        for record in records:
            try:
                self._store.insert([record])
            except ROW_ERRORS as exc:
                log.error(
                    "audit store refused %s record %s: %s; kept in %s",
                    record.get("kind"),
                    record.get("decision_id")
                    or record.get("action_id")
                    or f"{record.get('server_id')}@{record.get('from_us')}",
                    describe(exc),
                    REJECTED_FILE,
                )
                with (self._directory / REJECTED_FILE).open("ab") as file:
                    file.write(orjson.dumps({"error": describe(exc), "record": record}) + b"\n")
                    file.flush()
                    os.fsync(file.fileno())
                self.rejected += 1

    def _decode(self, payloads: list[bytes], segment_name: str) -> list[dict[str, Any]]:
        records = []
        for payload in payloads:
            try:
                records.append(decode(payload))
            except (orjson.JSONDecodeError, ValueError):
                # The checksum held, so this is what was written: a defect, not a torn write.
                log.error(
                    "audit journal: %s holds a record that is not an audit record", segment_name
                )
                self.skipped += 1
        return records

    # -- checkpoint --------------------------------------------------------------------

    def _advance_to_next_segment(self, segment: int) -> None:
        present = segments(self._directory)
        later = [s for s in present if s > segment]
        next_segment = later[0] if later else segment + 1
        self._save_checkpoint(Position(next_segment, len(MAGIC)), durable=True)
        for old in present:
            if old < next_segment:
                with contextlib.suppress(FileNotFoundError):
                    segment_path(self._directory, old).unlink()

    def _save_checkpoint(self, position: Position, *, durable: bool = False) -> None:
        """Replaces the checkpoint file atomically. ``durable`` fsyncs it too: done before
        deleting passed segments, so that after a machine crash it never points into one."""
        path = self._directory / CHECKPOINT_FILE
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as file:
            file.write(orjson.dumps({"segment": position.segment, "offset": position.offset}))
            if durable:
                file.flush()
                os.fsync(file.fileno())
        tmp.replace(path)
        self._checkpoint = position
