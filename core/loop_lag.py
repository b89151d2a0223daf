"""``LoopLag``: how late this process's event loop runs, measured by a probe that wakes
every ``interval_s``.

A stall over ``LOG_STALL_S`` is logged with what the loop's thread did meanwhile (on the
CPU, waiting for one, blocked, or none of these: the host or the kernel held the
process), and a ``StallWatch`` thread adds where the loop's thread was in the middle of
it. How to read that line: docs/runbook.md#answers-after-deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

from core.stall_watch import StallWatch
from core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# A stall this long is logged (at most once per LOG_EVERY_S): every request waited it out,
# and it is more than the response margin (12 ms) can absorb.
LOG_STALL_S = 0.03
LOG_EVERY_S = 10.0
# The stall watch looks at the loop's thread once the probe is this late: a stall that
# may reach LOG_STALL_S.
WATCH_OVERDUE_S = 0.02


class ThreadBusy:
    """Nanoseconds the calling thread has spent running or runnable (waiting in the
    run queue for a CPU), from ``/proc/thread-self/schedstat``; where that file does not
    exist, its CPU time alone (``time.thread_time_ns``)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None
        if self._fd is not None and self.running_and_waiting_ns() == (0, 0):
            self.close()  # a kernel that does not count

    def running_and_waiting_ns(self) -> tuple[int, int | None]:
        """Nanoseconds on a CPU and runnable but waiting for one (None: not counted here)."""
        if self._fd is None:
            return time.thread_time_ns(), None
        running, waiting, _ = os.pread(self._fd, 128, 0).split()
        return int(running), int(waiting)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GcClock:
    """Wall time spent in the cyclic garbage collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._began = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._began


@dataclass(frozen=True, slots=True)
class LoopThreadUsage:
    """What the loop's thread, and the process, had used at one moment."""

    thread: resource.struct_rusage  # CPU time, page faults, context switches
    process_cpu_s: float  # every thread of the process, the loop's included
    waiting_ns: int | None  # runnable but not running (None: the kernel does not say)
    gc_s: float  # in the cyclic garbage collector

    @classmethod
    def now(cls, busy: ThreadBusy, gc_clock: GcClock) -> LoopThreadUsage:
        process = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            thread=resource.getrusage(resource.RUSAGE_THREAD),
            process_cpu_s=process.ru_utime + process.ru_stime,
            waiting_ns=busy.running_and_waiting_ns()[1],
            gc_s=gc_clock.total_s,
        )

    def since(self, before: LoopThreadUsage) -> str:
        """What the loop's thread did between ``before`` and this, in words."""
        now, then = self.thread, before.thread
        cpu_s = now.ru_utime + now.ru_stime - then.ru_utime - then.ru_stime
        waited = (
            f"waited {(self.waiting_ns - before.waiting_ns) / 1e6:.0f} ms for a CPU, "
            if self.waiting_ns is not None and before.waiting_ns is not None
            else ""
        )
        others_s = max(self.process_cpu_s - before.process_cpu_s - cpu_s, 0.0)
        return (
            f"its thread ran {cpu_s * 1000:.0f} ms of it on the CPU"
            f" ({(now.ru_stime - then.ru_stime) * 1000:.0f} ms in the kernel,"
            f" {now.ru_minflt + now.ru_majflt - then.ru_minflt - then.ru_majflt} page faults,"
            f" {now.ru_nivcsw - then.ru_nivcsw} times preempted), {waited}blocked"
            f" {now.ru_nvcsw - then.ru_nvcsw} times, {(self.gc_s - before.gc_s) * 1000:.0f} ms"
            f" in garbage collection; the process's other threads ran {others_s * 1000:.0f} ms"
        )


class LoopLag:
    def __init__(self, *, interval_s: float = 0.005) -> None:
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._due = float("inf")  # when the probe should wake next (loop time)
        self._logged_at = float("-inf")
        self._gc = GcClock()
        self._watch: StallWatch | None = None

    async def start(self) -> None:
        if self._task is None:
            self._gc.install()
            self._watch = StallWatch(overdue_s=self._interval_s + WATCH_OVERDUE_S)
            self._watch.start()
            self._task = asyncio.create_task(self._probe(self._watch), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._gc.remove()
            if self._watch is not None:
                self._watch.stop()
            await cancel_and_wait(task)

    async def _probe(self, watch: StallWatch) -> None:
        loop = asyncio.get_running_loop()
        busy = ThreadBusy()  # opened here: the loop's own thread
        try:
            await self._probe_until_cancelled(loop, watch, busy)
        finally:
            busy.close()

    async def _probe_until_cancelled(
        self, loop: asyncio.AbstractEventLoop, watch: StallWatch, busy: ThreadBusy
    ) -> None:
        while True:
            self._due = loop.time() + self._interval_s
            before = LoopThreadUsage.now(busy, self._gc)
            watch.beat()
            await asyncio.sleep(self._interval_s)
            now = loop.time()
            late = now - self._due
            where = watch.take() if late > WATCH_OVERDUE_S else ""
            if late > LOG_STALL_S and now - self._logged_at >= LOG_EVERY_S:
                self._logged_at = now
                log.warning(
                    "event loop stalled %.0f ms: %s; in the middle of it: %s",
                    late * 1000,
                    LoopThreadUsage.now(busy, self._gc).since(before),
                    where or "not seen",
                )
