"""The shipping thread: when to ship a journal folder; ``BatchShipper`` knows how.

Caught up, it looks for new records every ``IDLE_INTERVAL_MS``. While the store fails,
the journal grows and decisions go on; it retries with backoff and ``status`` says so.
It migrates the store's schema first when asked, and makes the coming days' partitions
then and hourly; it compares the backlog with its cap (``full``), and at stop ships what
it can within the drain. It needs from the writer only the journal's position
(``written``); ``server.audit.ship_process`` runs it in a process of its own beside the
server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.backoff import Backoff
from server.audit.journal import Position
from server.audit.migrate import upgrade
from server.audit.shipper import BatchShipper, ShipperStatus, describe, over_cap
from server.audit.store import AuditStore

log = logging.getLogger(__name__)

# Caught up, how often to look again: a batch gathers, and the store lags the journal little.
IDLE_INTERVAL_MS = 100.0
RETRY_INITIAL_S = 0.05  # the first wait after the store fails; then doubling up to RETRY_MAX_S
# The longest wait while the store is down: found back within seconds, never hammered.
RETRY_MAX_S = 5.0
# How often the schema and the days' partitions are checked again after the start (two
# queries): a server running for days still finds tomorrow's partition made.
SCHEMA_CHECK_S = 3600.0


class AuditShipper:
    def __init__(
        self,
        directory: Path,
        store: AuditStore,
        *,
        written: Callable[[], Position | None],
        batch_records: int,
        migrate: bool,
        max_backlog_bytes: int = 0,
        idle_interval_ms: float = IDLE_INTERVAL_MS,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        """``written``: the end of the last record the folder's writer wrote whole, None
        when no process writes the folder (``BatchShipper``). ``max_backlog_bytes``:
        unshipped bytes at which ``full`` turns true (0: never)."""
        self._batches = BatchShipper(directory, store, written=written, batch_records=batch_records)
        self._store = store
        self._idle_interval_s = idle_interval_ms / 1000.0
        self._retry_max_s = retry_max_s
        # When to bring the schema to the head and make the coming days' partitions next.
        self._schema_due_at = 0.0 if migrate else float("inf")
        self._wake = threading.Event()
        self._stopping = False
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._store_ok: bool | None = None  # None: not reached yet
        self._last_error = ""
        self._max_backlog_bytes = max_backlog_bytes
        # Set after each batch or wait and by each status(); a bool, read without a lock.
        self.full = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._batches.resume()
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
        batches = self._batches
        return ShipperStatus(
            store_ok=self.store_ok,
            last_error=self._last_error,
            backlog_bytes=backlog,
            full=self.full,
            shipped_records=batches.shipped,
            skipped_records=batches.skipped,
            rejected_records=batches.rejected,
            last_shipped_at_us=batches.last_shipped_at_us,
        )

    def backlog_bytes(self) -> int:
        return self._batches.backlog_bytes()

    def ship_once(self) -> int:
        """Ships one batch on the caller's thread; returns how many records it passed
        (0: caught up)."""
        return self._batches.ship_once()

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
                if time.monotonic() >= self._schema_due_at:
                    upgrade(self._store.engine)
                    self._schema_due_at = time.monotonic() + SCHEMA_CHECK_S
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
            elif self._batches.reached_the_end(shipped):
                # Under steady load a few records arrive while one batch ships: shipping
                # them at once would spend a transaction and a checkpoint on each handful
                # and keep the shipper busy all the time. Waiting lets a batch gather.
                self._sleep(self._idle_interval_s)

    def _sleep(self, seconds: float) -> None:
        if self._stopping:
            # Draining: retry soon, but never past the deadline.
            seconds = min(seconds, max(0.0, self._drain_deadline - time.monotonic()))
        self._wake.wait(seconds)
        self._wake.clear()
