"""A child process in its own process group, with readiness waiting and group shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class ProcessStartError(RuntimeError):
    """A process exited or never became ready; the message carries its log tail."""


# Ports we hand to children come from their own range: below the kernel's range for
# outgoing connections, so no connection's local end can take one, and clear of the
# ports of a local stack (localstack: the default one and any offset one; a test holds
# them apart). One process never hands a port out twice: a child binds its port a while
# after we choose it, and a sibling chosen meanwhile must not get the same one. (Both
# races have failed CI with EADDRINUSE.)
CHILD_PORTS = range(10000, 16000)
_handed_out: set[int] = set()


def outgoing_ports() -> range:
    """The ports Linux picks local ends of outgoing connections from
    (``net.ipv4.ip_local_port_range``); empty where that cannot be read."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(0)
    return range(low, high + 1)


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free now, none handed out before by this process."""
    outgoing = outgoing_ports()
    candidates = [port for port in CHILD_PORTS if port not in outgoing]
    # A random start keeps two processes (a soak and a test run) off one sequence.
    start = random.randrange(len(candidates)) if candidates else 0  # noqa: S311 - not a secret
    chosen: list[int] = []
    for port in candidates[start:] + candidates[:start]:
        if len(chosen) == count:
            break
        if port not in _handed_out and _bindable(host, port):
            chosen.append(port)
    while len(chosen) < count:  # CHILD_PORTS all taken: let the kernel pick
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out and port not in chosen:
            chosen.append(port)
    _handed_out.update(chosen)
    return chosen


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` that are not zombies (Linux /proc)."""
    return live_members_by_group([pgid])[pgid]


def live_members_by_group(pgids: Iterable[int]) -> dict[int, list[int]]:
    """For each of ``pgids``, the pids in that process group that are not zombies, from
    one pass over /proc (a pass reads every process's stat: tens of ms on a busy box)."""
    members: dict[int, list[int]] = {pgid: [] for pgid in pgids}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in members and state != "Z":
            members[pgrp].append(int(stat.parent.name))
    return members


def start_ready(
    proc: ManagedProcess, ready: Callable[[], bool], timeout_s: float
) -> ManagedProcess:
    """Starts ``proc`` and waits until ``ready()``; stops it if it never gets there."""
    proc.start()
    try:
        proc.wait_ready(ready, timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc


def niced(argv: Sequence[str], niceness: int) -> list[str]:
    """``argv`` run at a lower CPU priority (``nice``: the same process, so its process
    group and children keep it)."""
    return ["nice", "-n", str(niceness), *argv] if niceness else list(argv)


def listening(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    return lambda: port_open(host, port)


class ManagedProcess:
    """Runs ``argv`` in a process group of its own; ``stop`` ends that whole group.

    TorchServe's launcher starts a JVM which starts Python workers: signalling the
    group reaches all of them, and only them. The group stays in the caller's session:
    with the kernel's autogroup scheduling on (``kernel.sched_autogroup_enabled``, the
    default on desktop and many VM kernels) each new session is a scheduling group of
    its own with a full share of the CPU, and ``nice`` (``BACKGROUND_NICENESS``) would
    only weigh a process against the others of its session: the niced broker,
    replayer, consumer and challenger would compete with the decision server as equals.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._cwd = cwd
        self._env = dict(env) if env is not None else None
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                self._argv,
                cwd=self._cwd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,  # see the class docstring: not a session
            )
        log.info("started %s (pid %d)", self.name, self._proc.pid)

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ProcessStartError(
                    f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.1)
        raise ProcessStartError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")

    def wait(self, timeout_s: float) -> int:
        """Waits for the process to exit by itself; returns its exit code."""
        if self._proc is None:
            raise ProcessStartError(f"{self.name} was never started")
        return self._proc.wait(timeout=timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def pause(self) -> None:
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def group_alive(self) -> bool:
        """Whether any member of the group still runs (zombies awaiting a reaper do not)."""
        return self._proc is not None and bool(live_group_members(self._proc.pid))

    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL to the whole group, as a crash would; waits until every member is gone."""
        if self._proc is None:
            return
        self.signal_group(signal.SIGKILL)
        self._proc.wait()
        deadline = time.monotonic() + timeout_s
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to the group, then SIGKILL after ``timeout_s``. Idempotent."""
        self.terminate()
        self.reap(timeout_s)

    def terminate(self) -> None:
        """SIGTERM to the group, which ``reap`` then waits for."""
        self.signal_group(signal.SIGCONT)  # a paused group cannot act on SIGTERM
        self.signal_group(signal.SIGTERM)

    def reap(self, timeout_s: float = 10.0) -> None:
        """Waits up to ``timeout_s`` for the leader to exit, then SIGKILL to the group."""
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0f s; killing", self.name, timeout_s)
        # The leader may be gone while its children (TorchServe workers) are not.
        self.signal_group(signal.SIGKILL)
        self._proc.wait()
        log.info("stopped %s", self.name)

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_all(procs: Iterable[ManagedProcess], timeout_s: float = 10.0) -> None:
    """Stops them side by side: SIGTERM to every group first, then each waited for (and
    killed after ``timeout_s``), so that their drains overlap."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.reap(timeout_s)
