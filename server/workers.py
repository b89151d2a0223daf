"""Several decision-server processes on one port: ``decision-server --workers N``.

One Python process serves one core's worth of gRPC at most, so N worker processes share
the ports with SO_REUSEPORT (grpc/grpc examples/python/multiprocessing); the kernel
spreads connections, not requests, over them. The supervisor forks them before any gRPC,
Redis or Kafka object exists (none is safe across a fork), restarts one that dies and
stops the server when one fails while starting. Each worker has its own journal folder,
metrics port and ``server_id``; a journal folder no worker owns now is adopted and
shipped. Details: docs/capacity.md#workers-several-server-processes-on-one-port.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import cast

from core.backoff import Backoff
from server.audit.shipper import unshipped_bytes
from server.settings import Settings

log = logging.getLogger(__name__)

WORKER_PREFIX = "worker-"
# A worker that ends within this long of its start failed to start: stop everything (a
# port in use will not go away by retrying).
STARTUP_S = 10.0
# After a signal, how long the supervisor waits for the workers beyond their own grace.
STOP_MARGIN_S = 5.0


def available_cpus() -> int:
    """The cores this process may run on (its affinity: a container's cpuset counts)."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True, slots=True)
class JournalPlan:
    own: Path  # the folder this worker writes
    adopted: tuple[Path, ...]  # folders no worker of this run writes, left to it to ship


def journal_plans(journal_dir: Path, workers: int) -> list[JournalPlan]:
    """Each worker's journal folder, and the folders it adopts: with one worker the
    journal is ``journal_dir`` itself (as before workers existed); with several,
    ``journal_dir/worker-<i>``. Folders of an earlier run that no worker owns now and
    that still hold unshipped records are shared out round-robin."""
    if workers == 1:
        owned = [journal_dir]
    else:
        owned = [journal_dir / f"{WORKER_PREFIX}{i}" for i in range(workers)]
    candidates = [journal_dir, *sorted(journal_dir.glob(f"{WORKER_PREFIX}*"))]
    orphans = [
        folder
        for folder in candidates
        if folder not in owned and folder.is_dir() and unshipped_bytes(folder) > 0
    ]
    return [JournalPlan(own, tuple(orphans[i::workers])) for i, own in enumerate(owned)]


def worker_settings(settings: Settings, index: int, workers: int, plan: JournalPlan) -> Settings:
    """What worker ``index`` of ``workers`` runs with: the shared ports with SO_REUSEPORT
    (several workers only), its own journal folder, metrics port and server id."""
    # The count, not the setting (0: one per CPU; --workers overrides it): the front
    # shares the port (SO_REUSEPORT) exactly when there are several.
    server = settings.server.model_copy(update={"workers": workers})
    if workers == 1:  # the journal is journal_dir itself, as before workers existed
        return settings.model_copy(update={"server": server})
    server_id = settings.audit.server_id or f"{socket.gethostname()}:{settings.server.port}"
    metrics_port = settings.server.metrics_port
    return settings.model_copy(
        update={
            "server": server.model_copy(
                update={"metrics_port": metrics_port + index if metrics_port else 0}
            ),
            "audit": settings.audit.model_copy(
                update={"journal_dir": str(plan.own), "server_id": f"{server_id}/w{index}"}
            ),
        }
    )


WorkerMain = Callable[[Settings, tuple[Path, ...]], None]

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker(
    run: WorkerMain, settings: Settings, adopted: tuple[Path, ...], supervisor: int
) -> None:
    """A worker process: it gets SIGTERM when the supervisor dies, even by SIGKILL, so
    that no worker outlives it holding the port and its journal folder."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != supervisor:  # it died before the line above
        return
    run(settings, adopted)


class Supervisor:
    """Starts ``workers`` processes running ``run(settings, adopted)`` and keeps them
    running until a signal; returns the exit code for the whole server."""

    def __init__(
        self, settings: Settings, workers: int, run: WorkerMain, *, startup_s: float = STARTUP_S
    ) -> None:
        """``startup_s``: a worker that ends sooner after its start failed to start."""
        self._settings = settings
        self._startup_s = startup_s
        self._workers = workers
        self._run = run
        self._plans = journal_plans(Path(settings.audit.journal_dir), workers)
        self._context = multiprocessing.get_context("fork")
        self._procs: dict[int, tuple[BaseProcess, float]] = {}  # index → (process, started)
        self._stopping = False

    def _start(self, index: int) -> None:
        plan = self._plans[index]
        settings = worker_settings(self._settings, index, self._workers, plan)
        proc = self._context.Process(
            target=_worker,
            args=(self._run, settings, plan.adopted, os.getpid()),
            name=f"decision-worker-{index}",
        )
        proc.start()
        self._procs[index] = (proc, time.monotonic())
        log.info("worker %d started (pid %s)", index, proc.pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        backoff = Backoff(initial_s=0.5, max_s=30.0)
        for index in range(self._workers):
            self._start(index)
        code = 0
        while not self._stopping:
            by_sentinel = {proc.sentinel: index for index, (proc, _) in self._procs.items()}
            for ended in wait(list(by_sentinel), timeout=0.5):
                index = by_sentinel[cast(int, ended)]
                proc, started = self._procs[index]
                proc.join()
                if self._stopping:
                    break
                if time.monotonic() - started < self._startup_s:
                    log.error(
                        "worker %d exited while starting (code %s): stopping the server",
                        index,
                        proc.exitcode,
                    )
                    self._stopping, code = True, 1
                    break
                delay_s = backoff.next_s()
                log.error(
                    "worker %d died (code %s); starting it again in %.1f s",
                    index,
                    proc.exitcode,
                    delay_s,
                )
                time.sleep(delay_s)
                if not self._stopping:
                    self._start(index)
        self._stop_all()
        return code

    def _stop_all(self) -> None:
        for proc, _ in self._procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        audit = self._settings.audit
        deadline = (
            time.monotonic()
            + self._settings.server.grace_period_s
            + audit.shutdown_drain_s
            + STOP_MARGIN_S
        )
        for index, (proc, _) in self._procs.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %d did not stop in time: killing it", index)
                proc.kill()
                proc.join()
        log.info("all workers stopped")
