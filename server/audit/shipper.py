"""Ships an audit journal folder into the SQL store, on a thread of its own.

It runs in a process of its own beside the server (``server.audit.ship_process``), so
that parsing and inserting never hold the server's interpreter lock; from the writer it
needs only the journal's position (``written``). The shipper reads from its checkpoint
(a small file beside the segments) up to the last complete record, inserts a batch in
one transaction, then moves the checkpoint and deletes the segments it has passed.
Inserts are idempotent, so a crash between the insert and the checkpoint only re-ships a
batch. While the store fails, the journal grows and decisions go on; the shipper retries
with backoff and ``status`` says so. A corrupt record in a closed segment (a torn write
that was never repaired) is logged and the rest of that segment skipped: nothing before
it is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy.exc

from core.backoff import Backoff
from server.audit.journal import (
    MAGIC,
    Position,
    parse_frames,
    read_range,
    segment_path,
    segments,
)
from server.audit.migrate import upgrade
from server.audit.record import decode
from server.audit.store import AuditStore

log = logging.getLogger(__name__)

# Room for a full batch: a decision record is about 1.2 KiB.
REJECTED_FILE = "rejected.jsonl"
# Errors that are about the rows, not the database being away: retrying cannot help.
ROW_ERRORS = (sqlalchemy.exc.DataError, sqlalchemy.exc.IntegrityError)
READ_CHUNK_BYTES = 16 << 20
CHECKPOINT_FILE = "shipped"
RETRY_INITIAL_S = 0.05  # the first wait after the store fails; then up to retry_max_s


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


class AuditShipper:
    def __init__(
        self,
        directory: Path,
        store: AuditStore,
        *,
        written: Callable[[], Position | None],
        batch_records: int,
        idle_interval_ms: float,
        retry_max_s: float,
        migrate: bool,
        max_backlog_bytes: int = 0,
    ) -> None:
        """``written``: the end of the last record the folder's writer wrote whole (read
        up to there and no further: past it a write may be in progress or being cut
        back); None when no process writes the folder (its complete records are all).
        ``max_backlog_bytes``: unshipped bytes at which ``full`` turns true (0: never)."""
        self._directory = directory
        self._written = written
        self._store = store
        self._batch_records = batch_records
        self._idle_interval_s = idle_interval_ms / 1000.0
        self._retry_max_s = retry_max_s
        self._schema_ready = not migrate
        self._checkpoint = Position(0, 0)
        self._wake = threading.Event()
        self._stopping = False
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._store_ok: bool | None = None  # None: not reached yet
        self._last_error = ""
        self._shipped = 0
        self._skipped = 0
        self._rejected = 0
        self._last_shipped_at_us = 0
        self._max_backlog_bytes = max_backlog_bytes
        # Set after each batch or wait and by each status(); a bool, read without a lock.
        self.full = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._checkpoint = self._load_checkpoint()
        self._check_backlog()
        self._thread = threading.Thread(target=self._run, name="audit-shipper", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout_s: float) -> bool:
        """Ships what it can within ``drain_timeout_s``; True when nothing is left behind."""
        if self._thread is None:
            return self.backlog_bytes() == 0
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self._stopping = True
        self._wake.set()
        self._thread.join(drain_timeout_s + 5.0)
        self._thread = None
        left = self.backlog_bytes()
        if left:
            log.warning(
                "audit shipper stopped with %d journal bytes unshipped; the next start ships them",
                left,
            )
        return left == 0

    @property
    def store_ok(self) -> bool:
        """The last attempt to reach the store succeeded (False before the first)."""
        return bool(self._store_ok)

    def status(self) -> ShipperStatus:
        """Now, the backlog measured afresh (``full`` with it, not only after a batch or
        a retry wait: the journal grows while the store is down)."""
        backlog = self.backlog_bytes()
        self._note_backlog(backlog)
        return ShipperStatus(
            store_ok=self.store_ok,
            last_error=self._last_error,
            backlog_bytes=backlog,
            full=self.full,
            shipped_records=self._shipped,
            skipped_records=self._skipped,
            rejected_records=self._rejected,
            last_shipped_at_us=self._last_shipped_at_us,
        )

    def backlog_bytes(self) -> int:
        return unshipped_bytes(self._directory, self._checkpoint)

    # -- the loop ----------------------------------------------------------------------

    def _check_backlog(self) -> None:
        if self._max_backlog_bytes > 0:
            self._note_backlog(self.backlog_bytes())

    def _note_backlog(self, backlog: int) -> None:
        """Sets ``full`` from the backlog against its cap, and says when it changes."""
        if self._max_backlog_bytes <= 0:
            return
        full = over_cap(backlog, self._max_backlog_bytes)
        if full and not self.full:
            log.error(
                "audit journal holds %d bytes not yet in the store (cap %d): new decisions"
                " are refused until the store takes the backlog",
                backlog,
                self._max_backlog_bytes,
            )
        elif self.full and not full:
            log.warning("audit journal backlog under its cap again: decisions resume")
        self.full = full

    def _run(self) -> None:
        backoff = Backoff(initial_s=RETRY_INITIAL_S, max_s=self._retry_max_s)
        while True:
            self._check_backlog()
            try:
                if not self._schema_ready:
                    upgrade(self._store.engine)
                    self._schema_ready = True
                shipped = self.ship_once()
            except Exception as exc:  # noqa: BLE001 - the thread's boundary: log, back off, retry
                problem = describe(exc)
                if self._store_ok is not False:
                    log.warning("audit store unavailable; journal keeps growing: %s", problem)
                self._store_ok = False
                self._last_error = problem
                if self._stopping and time.monotonic() >= self._drain_deadline:
                    return
                self._sleep(backoff.next_s())
                continue
            if self._store_ok is False:
                log.info("audit store reachable again; shipping the backlog")
            self._store_ok, self._last_error = True, ""
            backoff.reset()
            if shipped == 0:
                if self._stopping:
                    return
                self._sleep(self._idle_interval_s)
            elif self._stopping:
                if time.monotonic() >= self._drain_deadline:
                    return
            elif self._reached_the_end(shipped):
                # Under steady load a few records arrive while one batch ships: shipping
                # them at once would spend a transaction and a checkpoint on each handful,
                # a thread busy all the time beside the event loop (a quarter of the
                # server's samples at 850 decisions/s). Waiting lets a batch gather.
                self._sleep(self._idle_interval_s)

    def _reached_the_end(self, shipped: int) -> bool:
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

    def _sleep(self, seconds: float) -> None:
        if self._stopping:
            # Draining: retry soon, but never past the deadline.
            seconds = min(seconds, max(0.0, self._drain_deadline - time.monotonic()))
        self._wake.wait(seconds)
        self._wake.clear()

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
                self._skipped += 1
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
            self._shipped += len(records)
            self._last_shipped_at_us = time.time_ns() // 1000
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
                    record.get("decision_id") or record.get("action_id"),
                    describe(exc),
                    REJECTED_FILE,
                )
                with (self._directory / REJECTED_FILE).open("ab") as file:
                    file.write(orjson.dumps({"error": describe(exc), "record": record}) + b"\n")
                    file.flush()
                    os.fsync(file.fileno())
                self._rejected += 1

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
                self._skipped += 1
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

    def _load_checkpoint(self) -> Position:
        saved = read_checkpoint(self._directory)
        if saved is not None:
            return saved
        present = segments(self._directory)
        return Position(present[0] if present else 0, len(MAGIC))

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
