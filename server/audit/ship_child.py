"""The shipper process's own side: ships one journal folder up to where its server says.

It reads the request line, waits for the folder's ``SHIPPER_LOCK`` (a child of an
earlier server may still drain), runs an ``AuditShipper`` at ``SHIP_NICE``, writes its
status every ``STATUS_INTERVAL_S`` and follows the positions the server writes; when
its stdin ends it drains and exits. ``server.audit.ship_process`` describes the protocol
and starts it (``CHILD_CODE``); it is not a command to run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import sys
import time
from dataclasses import asdict
from pathlib import Path

import orjson

from core.logs import configure_logging
from server.audit.journal import Position
from server.audit.settings import AuditSettings
from server.audit.ship_thread import AuditShipper
from server.audit.store import AuditStore, create_store_engine

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.1
# When the cores are busy the decision path comes first; the backlog absorbs the difference.
SHIP_NICE = 10
# Records inserted in one transaction, at most.
SHIP_BATCH_RECORDS = 5000
LOCK_FILE = "SHIPPER_LOCK"


class _Writer:
    """Where the server's journal is, as it last said; None once its stdin ended (no
    writer: the folder's complete records are all there is)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = b""
        self.position: Position | None = None

    def read_line(self) -> bytes:
        """The first line (the request), blocking."""
        while b"\n" not in self._pending:
            data = os.read(self._fd, 1 << 16)
            if not data:
                raise EOFError("the server closed the pipe before its request")
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def take(self) -> bool:
        """Reads what the server wrote; False once its stdin has ended."""
        data = os.read(self._fd, 1 << 16)
        if not data:
            self.position = None
            return False
        *lines, self._pending = (self._pending + data).split(b"\n")
        if lines:
            segment, offset = lines[-1].split()
            self.position = Position(int(segment), int(offset))
        return True


def _lock(directory: Path) -> int:
    """Waits for the folder's shipper lock (a child of a stopped server may still drain)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _report(shipper: AuditShipper) -> bool:
    """Writes the status line; False when the server is gone (the pipe is closed)."""
    try:
        sys.stdout.buffer.write(orjson.dumps(asdict(shipper.status())) + b"\n")
        sys.stdout.buffer.flush()
    except (BrokenPipeError, OSError):
        return False
    return True


def _serve(stdin_fd: int) -> None:
    writer = _Writer(stdin_fd)
    request = orjson.loads(writer.read_line())
    configure_logging(request["log_level"], request["log_format"])
    settings = AuditSettings.model_validate(request["settings"])
    os.nice(SHIP_NICE)
    writer.position = Position(*request["position"])
    directory = Path(request["directory"])
    _lock(directory)
    store = AuditStore(create_store_engine(settings.database_url))
    shipper = AuditShipper(
        directory,
        store,
        written=lambda: writer.position,
        batch_records=SHIP_BATCH_RECORDS,
        migrate=request["migrate"],
        idle_interval_ms=request["idle_interval_ms"],
        max_backlog_bytes=settings.max_backlog_bytes,
    )
    shipper.start()
    try:
        while _report(shipper):
            readable, _, _ = select.select([stdin_fd], [], [], STATUS_INTERVAL_S)
            if readable and not writer.take():
                break  # the server closed our stdin: stopping, or gone
    finally:
        shipper.stop(settings.shutdown_drain_s)
        _report(shipper)
        store.dispose()


def main() -> None:
    started = time.monotonic()
    try:
        _serve(sys.stdin.fileno())
    except Exception:  # the process's boundary: the server starts another
        log.exception("audit shipper process failed after %.1f s", time.monotonic() - started)
        sys.exit(1)
