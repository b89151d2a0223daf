"""The audit shipper in a process of its own, and the server's handle on it.

Shipping parses records and builds insert parameters in Python: on a thread of the server
it held the interpreter lock the event loop needs. A child process
(``server.audit.ship_child``) shares no lock with the server, runs at a lower CPU
priority, ships only up to the journal position the server tells it, and drains and
exits when its stdin ends. The protocol: ``ShipperProcess``. The audit trail:
docs/audit.md; the shipper apart, measured: docs/capacity.md#measured-inputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import IO, cast

import orjson

from core.backoff import Backoff
from server.audit.journal import Journal, Position
from server.audit.settings import AuditSettings
from server.audit.ship_child import STATUS_INTERVAL_S
from server.audit.ship_thread import IDLE_INTERVAL_MS
from server.audit.shipper import ShipperStatus, over_cap, unshipped_bytes

log = logging.getLogger(__name__)

# How long a stopping server waits for its child past the drain, before killing it
# (more than the child gives its own shipping thread past the drain: 5 s).
EXIT_SLACK_S = 10.0
# Without a status line for this long, the server measures the backlog itself.
SILENT_S = 3 * STATUS_INTERVAL_S
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
# Secrets the child has no use for stay out of its environment (and /proc).
SECRET_VARIABLES = frozenset({"DECISION_ADMIN__TOKENS"})
# A Ctrl-C or a SIGTERM sent to the server's process group must not cut the drain short:
# the server decides when shipping stops (it closes the child's stdin). Ignored before
# the imports, which leaves only the interpreter's own start (tens of ms) unguarded.
CHILD_CODE = """\
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from server.audit.ship_child import main
main()
"""


def child_environment() -> dict[str, str]:
    """This process's environment, less what the child must not hold."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}


class ShipperProcess:
    """Starts, watches and stops the shipper child of one journal folder.

    The protocol is two pipes. On the child's stdin the server writes one JSON line of
    settings, then, after each status line it reads, the journal's position (``segment
    offset``: the end of the last record written whole) when it moved. The child ships
    only up to that position, never what it merely sees in the folder (a write being cut
    back after a failure, a segment a failing rotation creates and deletes). The end of
    stdin (the server stopping, or dying) means no writer is left: the child ships the
    folder's complete records within ``audit.shutdown_drain_s`` and exits. On stdout the
    child writes its status, a JSON line every ``STATUS_INTERVAL_S``; its logs go to
    stderr, the server's own. A child that exits unasked is started again; while none
    reports, the server measures the backlog (and the cap) from the folder itself. A
    child holds its folder's ``SHIPPER_LOCK``, so the next waits for one still draining.
    """

    def __init__(
        self,
        journal: Journal,
        settings: AuditSettings,
        *,
        migrate: bool,
        log_level: str,
        log_format: str,
        idle_interval_ms: float = IDLE_INTERVAL_MS,
    ) -> None:
        """``journal``: the folder's writer, opened before ``start``. ``idle_interval_ms``:
        how often the child, caught up, looks for new records."""
        self._journal = journal
        self._directory = journal.directory
        self._request = {
            "directory": str(journal.directory),
            "settings": settings.model_dump(mode="json"),
            "migrate": migrate,
            "log_level": log_level,
            "log_format": log_format,
            "idle_interval_ms": idle_interval_ms,
        }
        self._max_backlog_bytes = settings.max_backlog_bytes
        self._child: subprocess.Popen[bytes] | None = None
        self._told: Position | None = None  # the position the child last got
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        # Held to start a child, to close its stdin and to write to it: stop() never
        # misses a child being started, and no write goes to a descriptor closed (and
        # perhaps reused) under it.
        self._lock = threading.Lock()
        self._status = ShipperStatus(
            store_ok=False,
            last_error="the shipper process has not reported yet",
            backlog_bytes=0,
            full=False,
            shipped_records=0,
            skipped_records=0,
            rejected_records=0,
            last_shipped_at_us=0,
        )
        # Counts of children that exited, so that a restart does not reset the totals.
        self._earlier = (0, 0, 0)
        self._tried = threading.Event()  # a child has tried the store once

    @property
    def store_ok(self) -> bool:
        return self._status.store_ok

    @property
    def pid(self) -> int | None:
        """The child's process id; None before the start."""
        child = self._child
        return None if child is None else child.pid

    @property
    def full(self) -> bool:
        """Read on the decision path: from the last status, or measured here while no
        child reports (at most ``SILENT_S`` old)."""
        return self._status.full

    def status(self) -> ShipperStatus:
        return self._status

    def start(self) -> None:
        if self._watcher is not None:
            return
        self._measure_backlog()
        self._child = self._spawn()
        self._watcher = threading.Thread(
            target=self._watch, name="audit-shipper-watch", daemon=True
        )
        self._watcher.start()

    def wait_tried(self, timeout_s: float) -> bool:
        """Waits until a child has started and tried the store once (reached it and
        migrated it, or failed to); False if that took longer than ``timeout_s``."""
        return self._tried.wait(timeout_s)

    def begin_stop(self) -> None:
        """Tells the child no more records come (the journal is closed by now): it ships
        what it can within the drain and exits. ``stop`` waits for it."""
        with self._lock:
            self._stopping.set()
            child = self._child
            if child is not None:
                _close_quietly(child.stdin)

    def stop(self, drain_timeout_s: float) -> bool:
        """Stops the child (``begin_stop``) and waits for it; True when nothing is left
        behind."""
        if self._watcher is None:
            return unshipped_bytes(self._directory) == 0
        self.begin_stop()
        child = self._child
        if child is not None:
            try:
                child.wait(drain_timeout_s + EXIT_SLACK_S)
            except subprocess.TimeoutExpired:
                log.error("audit shipper process %d did not stop; killing it", child.pid)
                child.kill()
                child.wait()
        self._watcher.join(EXIT_SLACK_S)
        self._watcher = None
        left = unshipped_bytes(self._directory)
        if left:
            log.warning(
                "audit shipper stopped with %d journal bytes unshipped; the next start ships them",
                left,
            )
        return left == 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        # No preexec_fn: no Python runs between fork and exec in a process with gRPC's
        # threads. In the server's process group, so that its CPU is counted with the
        # server's and a kill of the group reaches it.
        child = subprocess.Popen(  # noqa: S603 - our interpreter and our code
            [sys.executable, "-c", CHILD_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            env=child_environment(),
        )
        position = self._journal.position
        request = {**self._request, "position": [position.segment, position.offset]}
        stdin = cast(IO[bytes], child.stdin)  # a pipe, as asked
        stdin.write(orjson.dumps(request) + b"\n")
        stdin.flush()
        # From here on only position lines, never waiting on a child that reads none.
        os.set_blocking(stdin.fileno(), False)
        self._told = position
        return child

    def _watch(self) -> None:
        """Follows the child's status; starts it again if it exits unasked."""
        backoff = Backoff(initial_s=RESTART_INITIAL_S, max_s=RESTART_MAX_S)
        child: subprocess.Popen[bytes] | None = self._child
        while True:
            if child is not None:
                self._follow(child, backoff)
                code = child.wait()
                _close_quietly(child.stdout)
                with self._lock:
                    _close_quietly(child.stdin)
                if self._stopping.is_set():
                    return
                log.error("audit shipper process exited with code %s; starting it again", code)
                self._note_down(f"the shipper process exited with code {code}")
            if self._wait_measuring(backoff.next_s()):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    child = self._child = self._spawn()
                except OSError as exc:
                    log.error("audit shipper process could not start: %s; will retry", exc)
                    self._note_down(f"the shipper process could not start: {exc}")
                    child = None

    def _follow(self, child: subprocess.Popen[bytes], backoff: Backoff) -> None:
        """Takes the child's status lines until its stdout ends; after each, tells it
        where the journal is."""
        stdout = cast(IO[bytes], child.stdout).fileno()
        pending = b""
        while True:
            readable, _, _ = select.select([stdout], [], [], SILENT_S)
            if not readable:  # starting, waiting for the lock, or starved of CPU
                self._measure_backlog()
                continue
            data = os.read(stdout, 1 << 16)
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                self._take(line)
                backoff.reset()
            self._tell_position(child)

    def _tell_position(self, child: subprocess.Popen[bytes]) -> None:
        position = self._journal.position
        if position == self._told:
            return
        with self._lock:
            stdin = child.stdin
            if stdin is None or stdin.closed:
                return
            try:
                # One short line: a pipe writes it whole or not at all (PIPE_BUF).
                os.write(stdin.fileno(), f"{position.segment} {position.offset}\n".encode())
            except BlockingIOError:
                return  # the child reads none now; the next status line tries again
            except OSError:
                return  # the child is gone; _watch sees its stdout end
        self._told = position

    def _wait_measuring(self, seconds: float) -> bool:
        """Waits ``seconds`` (True: stopping), measuring the backlog meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.wait(min(left, SILENT_S)):
                return True
            self._measure_backlog()
        return self._stopping.is_set()

    def _measure_backlog(self) -> None:
        """The backlog and the cap from the folder itself (the checkpoint file), while
        no child says them."""
        backlog = unshipped_bytes(self._directory)
        full = over_cap(backlog, self._max_backlog_bytes)
        self._status = replace(self._status, backlog_bytes=backlog, full=full)

    def _note_down(self, error: str) -> None:
        last = self._status
        self._earlier = (last.shipped_records, last.skipped_records, last.rejected_records)
        self._status = replace(last, last_error=error)

    def _take(self, line: bytes) -> None:
        try:
            reported = ShipperStatus(**orjson.loads(line))
        except (orjson.JSONDecodeError, TypeError):
            log.error("audit shipper process wrote a line that is not its status: %r", line[:200])
            return
        # This child's counts on top of the earlier children's; the last ship, the latest.
        shipped, skipped, rejected = self._earlier
        self._status = replace(
            reported,
            shipped_records=shipped + reported.shipped_records,
            skipped_records=skipped + reported.skipped_records,
            rejected_records=rejected + reported.rejected_records,
            last_shipped_at_us=max(self._status.last_shipped_at_us, reported.last_shipped_at_us),
        )
        if reported.store_ok or reported.last_error:
            self._tried.set()


def _close_quietly(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()
