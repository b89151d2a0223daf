"""What the soak reads off the running stack besides the answers: each process group's
CPU and memory, the machine's busy and steal shares and the audit rows.

CPU is the group's (a TorchServe replica is a launcher, a JVM and a Python worker)
user + system time over the window, as a share of one core; memory is the group's
summed RSS. Everything is read from /proc (through psutil) and the processes' own
stores, so sampling costs the stack nothing.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the virtualenv

from core.processes import ManagedProcess, live_members_by_group


@dataclass(frozen=True, slots=True)
class GroupUsage:
    cpu_s: float  # user + system seconds of the group's live members, cumulative
    rss_mb: float


def usage_of(pids: list[int]) -> GroupUsage:
    cpu_s = rss_bytes = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):  # exited between the listing and the read
            process = psutil.Process(pid)
            times, rss_bytes = process.cpu_times(), rss_bytes + process.memory_info().rss
            cpu_s += times.user + times.system
    return GroupUsage(cpu_s, rss_bytes / 1e6)


class ProcessSampler:
    """CPU share (of one core) and RSS per process group, between successive samples. A
    member that exits takes its CPU time with it (the group reads low for one window,
    never negative); a process restarted (chaos) is followed to its new group."""

    def __init__(
        self, processes: Mapping[str, ManagedProcess], *, own_name: str | None = None
    ) -> None:
        """``own_name``: also sample this process (the load generator) under that name."""
        self._processes = {name: proc for name, proc in processes.items() if proc.pid}
        self._own_name = own_name
        self._last: dict[str, GroupUsage] = {}
        self._last_at = 0.0

    def sample(self, now: float) -> dict[str, tuple[float, float]]:
        """name -> (CPU % of one core since the last sample, RSS MB now)."""
        pgids = {name: proc.pid for name, proc in self._processes.items() if proc.pid}
        members = live_members_by_group(pgids.values())
        usage = {name: usage_of(members[pgid]) for name, pgid in pgids.items()}
        if self._own_name:
            usage[self._own_name] = usage_of([os.getpid()])
        elapsed = now - self._last_at if self._last_at else 0.0
        result = {}
        for name, now_usage in usage.items():
            before = self._last.get(name)
            cpu = 0.0
            if before is not None and elapsed > 0:
                cpu = max(0.0, now_usage.cpu_s - before.cpu_s) / elapsed * 100.0
            result[name] = (cpu, now_usage.rss_mb)
        self._last, self._last_at = usage, now
        return result


def machine_usage() -> tuple[float, float]:
    """The whole machine since the last call, as % of all its cores: (busy, stolen). A
    broken window on a shared VM may be the machine's (steal: the host ran someone else
    while this VM wanted a CPU; or every core busy), not the stack's."""
    times = psutil.cpu_times_percent(interval=None)
    return times.user + times.nice + times.system + times.irq + times.softirq, times.steal


def stored_decision_ids(database: Path) -> set[str]:
    """Decision ids in the SQLite audit store, read through a read-only connection."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
        return {row[0] for row in connection.execute("SELECT decision_id FROM decisions")}


def command_line(pid: int) -> str:
    with contextlib.suppress(psutil.Error):  # ended meanwhile
        return " ".join(psutil.Process(pid).cmdline())
    return ""


def group_cpu_seconds(pgids: Sequence[int | None], apart: str = "") -> list[float]:
    """CPU seconds of each process group's live members (0.0 for None), from one pass
    over /proc: a ManagedProcess is its group's leader, so its group is the process
    and everything it started (TorchServe's JVM and workers, the server's workers). A
    member that exits takes its seconds with it (they all live for the whole run).
    With ``apart``, two figures a group: the members whose command line does not hold
    it, then those that do (a decision server's audit shipper children)."""
    members = live_members_by_group(pgid for pgid in pgids if pgid)
    seconds = []
    for pgid in pgids:
        pids = members[pgid] if pgid else []
        marked = {pid for pid in pids if apart and apart in command_line(pid)}
        parts = [[p for p in pids if p not in marked], list(marked)] if apart else [pids]
        seconds += [usage_of(part).cpu_s for part in parts]
    return seconds
