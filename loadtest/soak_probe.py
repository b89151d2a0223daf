"""What the soak reads off the running stack besides the answers: each process group's
CPU and memory, the machine's busy and steal shares, the consumer group's lag and the
audit rows.

CPU is the group's (a TorchServe replica is a launcher, a JVM and a Python worker)
user + system time over the window, as a share of one core; memory is the group's
summed RSS. Everything is read from /proc and the processes' own stores, so sampling
costs the stack nothing.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.processes import ManagedProcess, live_members_by_group
from loadtest.soak_levers import Decided

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class GroupUsage:
    cpu_s: float  # user + system seconds of the group's live members, cumulative
    rss_mb: float


def usage_of(pids: list[int]) -> GroupUsage:
    cpu_ticks = 0
    rss_pages = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited between the listing and the read
        # Fields after the name, from 0: state=0 ... utime=11, stime=12, rss=21.
        cpu_ticks += int(fields[11]) + int(fields[12])
        rss_pages += int(fields[21])
    return GroupUsage(cpu_ticks / CLOCK_TICKS, rss_pages * PAGE_BYTES / 1e6)


class ProcessSampler:
    """CPU share (of one core) and RSS per process group, between successive samples.

    A member that exits takes its CPU time with it; the group's CPU then reads low for
    one window, never negative. A process restarted (a chaos restart) is followed to its
    new group.
    """

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


@dataclass(frozen=True, slots=True)
class MachineUsage:
    """The whole machine between two samples, as a share of all its cores."""

    busy_pct: float  # user, nice, system, irq, softirq
    steal_pct: float  # time the hypervisor ran someone else while this VM wanted a CPU


class MachineSampler:
    """The machine's busy and steal time per window, from ``/proc/stat``: a broken window
    on a shared VM may be the machine's (steal, or every core busy), not the stack's."""

    def __init__(self, stat_path: Path = Path("/proc/stat")) -> None:
        self._path = stat_path
        self._last = self._read()

    def _read(self) -> list[int]:
        # cpu user nice system idle iowait irq softirq steal ...
        return [int(x) for x in self._path.read_text().split("\n", 1)[0].split()[1:9]]

    def sample(self) -> MachineUsage:
        now = self._read()
        user, nice, system, idle, iowait, irq, softirq, steal = (
            b - a for a, b in zip(self._last, now, strict=True)
        )
        self._last = now
        total = user + nice + system + idle + iowait + irq + softirq + steal
        if total <= 0:
            return MachineUsage(0.0, 0.0)
        busy = user + nice + system + irq + softirq
        return MachineUsage(100.0 * busy / total, 100.0 * steal / total)


class ConsumerLag:
    """Messages produced to ``topic`` and not yet committed by ``group``."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self._topic = topic
        self._group = group
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        self._offsets = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        self._topic_partitions: list[TopicPartition] = []

    async def start(self) -> None:
        await self._admin.start()
        await self._offsets.start()

    async def stop(self) -> None:
        await self._offsets.stop()
        await self._admin.close()

    async def _partitions(self) -> list[TopicPartition]:
        # Asked of the broker: a consumer that subscribes to nothing learns a topic's
        # partitions only at its next metadata refresh (minutes), and read a lag of 0.
        if not self._topic_partitions:
            topics = await self._admin.describe_topics([self._topic])
            self._topic_partitions = [
                TopicPartition(self._topic, partition["partition"])
                for topic in topics
                if topic["topic"] == self._topic and topic["error_code"] == 0
                for partition in topic["partitions"]
            ]
        return self._topic_partitions

    async def read(self) -> int:
        """The lag, or -1 while the topic's partitions are unknown (not created yet)."""
        tps = await self._partitions()
        if not tps:
            return -1
        ends = await self._offsets.end_offsets(tps)
        committed = await self._admin.list_consumer_group_offsets(self._group, partitions=tps)
        return sum(
            max(0, ends[tp] - (committed[tp].offset if tp in committed else 0)) for tp in tps
        )


def stored_decision_ids(database: Path) -> set[str]:
    """Decision ids in the SQLite audit store, read through a read-only connection."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
        return {row[0] for row in connection.execute("SELECT decision_id FROM decisions")}


def audited_decisions(database: Path, request_prefix: str) -> list[Decided]:
    """The audit rows of the calls whose request id starts with ``request_prefix`` (one
    soak's: the run folder's audit store outlives a run)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
        rows = connection.execute(
            "SELECT symbol, received_at, decision, source, reason FROM decisions"
            " WHERE substr(request_id, 1, ?) = ?",
            (len(request_prefix), request_prefix),
        ).fetchall()
    return [
        Decided(symbol, _unix_s(received), decision, source, reason)
        for symbol, received, decision, source, reason in rows
    ]


def _unix_s(stored: str) -> float:
    """A time as the audit store keeps it in SQLite (ISO, UTC, with or without zone)."""
    when = datetime.fromisoformat(stored)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def group_cpu_seconds(pgids: Sequence[int | None]) -> list[float]:
    """CPU seconds of each process group's live members (0.0 for None), from one pass
    over /proc: a ManagedProcess is its group's leader, so its group is the process
    and everything it started (TorchServe's JVM and workers, the server's workers). A
    member that exits takes its seconds with it (they all live for the whole run)."""
    members = live_members_by_group(pgid for pgid in pgids if pgid)
    return [usage_of(members[pgid]).cpu_s if pgid else 0.0 for pgid in pgids]
