"""The audit shipper in a process of its own, and the server's handle on it.

Shipping parses records and builds insert parameters in Python: on a thread of the
server it held the interpreter lock the event loop needs (side by side on two cores,
Decide at 700/s had p99 18-34 ms with the thread and 12-15 ms with this process). A
child process shares no lock with the server, runs at a lower CPU priority
(``audit.ship_nice``) so that the decision path comes first when the cores are busy, and
reads only the journal folder.

The protocol is two pipes. The server writes one JSON line of settings to the child's
stdin and keeps stdin open: its end (the server stopping, or dying however it dies)
tells the child to ship what it can within ``audit.shutdown_drain_s`` and exit, so a
child never outlives its server by more than that. The child writes its status as a
JSON line on stdout every ``STATUS_INTERVAL_S``; its logs go to stderr, the server's
own. A child that exits unasked is started again; a child holds an exclusive lock on
its folder's ``SHIPPER_LOCK``, so the next one waits for one still draining.

The child is started by the server (``CHILD_CODE``); it is not a command to run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, cast

import orjson

from core.backoff import Backoff
from server.audit.shipper import AuditShipper, ShipperStatus, unshipped_bytes
from server.audit.store import AuditStore, create_store_engine
from server.logs import configure_logging
from server.settings import AuditSettings

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.1
LOCK_FILE = "SHIPPER_LOCK"
# How long a stopping server waits for its child past the drain, before killing it.
EXIT_SLACK_S = 5.0
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
# A Ctrl-C or a SIGTERM sent to the server's process group must not cut the drain short:
# the server decides when shipping stops (it closes the child's stdin). Ignored before
# the imports, which leaves only the interpreter's own start (tens of ms) unguarded.
CHILD_CODE = """\
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from server.audit.ship_process import main
main()
"""


class ShipperProcess:
    """Starts, watches and stops the shipper child of one journal folder."""

    def __init__(
        self,
        directory: Path,
        settings: AuditSettings,
        *,
        migrate: bool,
        log_level: str,
        log_format: str,
    ) -> None:
        self._directory = directory
        self._request = orjson.dumps(
            {
                "directory": str(directory),
                "settings": settings.model_dump(mode="json"),
                "migrate": migrate,
                "log_level": log_level,
                "log_format": log_format,
            }
        )
        self._drain_s = settings.shutdown_drain_s
        self._child: subprocess.Popen[bytes] | None = None
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # stop() never misses a child being started
        self._status = ShipperStatus(
            store_ok=False,
            last_error="the shipper process has not reported yet",
            backlog_bytes=unshipped_bytes(directory),
            full=False,
            shipped_records=0,
            skipped_records=0,
            rejected_records=0,
            last_shipped_at_us=0,
        )
        # Counts of children that exited, so that a restart does not reset the totals.
        self._earlier = (0, 0, 0)

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
        """Read on the decision path: the last status, at most ``STATUS_INTERVAL_S`` old."""
        return self._status.full

    def status(self) -> ShipperStatus:
        return self._status

    def start(self) -> None:
        if self._watcher is not None:
            return
        self._child = self._spawn()
        self._watcher = threading.Thread(
            target=self._watch, name="audit-shipper-watch", daemon=True
        )
        self._watcher.start()

    def stop(self, drain_timeout_s: float) -> bool:
        """Asks the child to ship what it can within ``drain_timeout_s`` (the folder's
        writer is closed by now) and waits for it; True when nothing is left behind."""
        if self._watcher is None:
            return unshipped_bytes(self._directory) == 0
        with self._spawning:
            self._stopping.set()
            child = self._child
        if child is not None:
            _close_quietly(child.stdin)
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
        )
        stdin = cast(IO[bytes], child.stdin)  # a pipe, as asked
        stdin.write(self._request + b"\n")
        stdin.flush()
        return child

    def _watch(self) -> None:
        """Reads the child's status lines; starts it again if it exits unasked."""
        backoff = Backoff(initial_s=RESTART_INITIAL_S, max_s=RESTART_MAX_S)
        while True:
            child = cast(subprocess.Popen[bytes], self._child)  # set before this thread
            for line in cast(IO[bytes], child.stdout):
                self._take(line)
                backoff.reset()
            code = child.wait()
            _close_quietly(child.stdin)
            _close_quietly(child.stdout)
            if self._stopping.is_set():
                return
            log.error("audit shipper process exited with code %s; starting it again", code)
            last = self._status
            self._earlier = (
                last.shipped_records,
                last.skipped_records,
                last.rejected_records,
            )
            self._status = ShipperStatus(
                **{
                    **asdict(last),
                    "store_ok": False,
                    "last_error": f"the shipper process exited with code {code}",
                }
            )
            if self._stopping.wait(backoff.next_s()):
                return
            with self._spawning:
                if self._stopping.is_set():
                    return
                self._child = self._spawn()

    def _take(self, line: bytes) -> None:
        try:
            fields = orjson.loads(line)
            shipped, skipped, rejected = self._earlier
            self._status = ShipperStatus(
                store_ok=bool(fields["store_ok"]),
                last_error=str(fields["last_error"]),
                backlog_bytes=int(fields["backlog_bytes"]),
                full=bool(fields["full"]),
                shipped_records=shipped + int(fields["shipped_records"]),
                skipped_records=skipped + int(fields["skipped_records"]),
                rejected_records=rejected + int(fields["rejected_records"]),
                last_shipped_at_us=int(fields["last_shipped_at_us"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("audit shipper process wrote a line that is not its status: %r", line[:200])


def _close_quietly(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()


# -- the child -------------------------------------------------------------------------


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


def _serve(stdin: IO[bytes]) -> None:
    request = orjson.loads(stdin.readline())  # the one line the server writes
    configure_logging(request["log_level"], request["log_format"])
    settings = AuditSettings.model_validate(request["settings"])
    os.nice(settings.ship_nice)
    directory = Path(request["directory"])
    _lock(directory)
    store = AuditStore(create_store_engine(settings.database_url))
    shipper = AuditShipper(
        directory,
        store,
        batch_records=settings.ship_batch_records,
        idle_interval_ms=settings.ship_idle_interval_ms,
        retry_max_s=settings.ship_retry_max_s,
        migrate=request["migrate"],
        max_backlog_bytes=settings.max_backlog_bytes,
    )
    shipper.start()
    try:
        while _report(shipper):
            readable, _, _ = select.select([stdin], [], [], STATUS_INTERVAL_S)
            if readable and not os.read(stdin.fileno(), 4096):
                break  # the server closed our stdin: stopping, or gone
    finally:
        shipper.stop(settings.shutdown_drain_s)
        _report(shipper)
        store.dispose()


def main() -> None:
    started = time.monotonic()
    try:
        _serve(sys.stdin.buffer)
    except Exception:  # the process's boundary: the server starts another
        log.exception("audit shipper process failed after %.1f s", time.monotonic() - started)
        sys.exit(1)

