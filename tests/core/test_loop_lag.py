"""The event-loop probe (a real loop, blocked on purpose)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator

import pytest

from core.loop_lag import LoopLag

pytestmark = pytest.mark.timed  # stalls and CPU time, measured against the wall clock


def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)


def burn_cpu(seconds: float) -> None:
    """Keeps the loop's thread running (a long callback), not sleeping."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


STALL_LINE = re.compile(
    r"stalled (?P<stalled>\d+) ms: its thread ran (?P<cpu>\d+) ms of it on the CPU"
    r" \((?P<kernel>\d+) ms in the kernel, (?P<faults>\d+) page faults,"
    r" (?P<preempted>\d+) times preempted\), waited (?P<waited>\d+) ms for a CPU,"
    r" blocked (?P<blocked>\d+) times, (?P<gc>\d+) ms in garbage collection;"
    r" the process's other threads ran (?P<others>\d+) ms"
)


@contextlib.asynccontextmanager
async def probe_running() -> AsyncIterator[None]:
    """A probe running around the block, with time to wake before and after it."""
    lag = LoopLag(interval_s=0.002)
    await lag.start()
    try:
        await asyncio.sleep(0.01)
        yield
        await asyncio.sleep(0.01)
    finally:
        await lag.stop()


def logged_stall(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    (record,) = [r for r in caplog.records if "event loop stalled" in r.getMessage()]
    found = STALL_LINE.search(record.getMessage())
    assert found, record.getMessage()
    return {name: int(value) for name, value in found.groupdict().items()}


async def test_a_stall_is_logged_with_the_cpu_and_collection_time_it_took(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with probe_running():
        began = time.thread_time()
        while time.thread_time() - began < 0.08:  # on the CPU, not asleep
            gc.collect(0)
    stall = logged_stall(caplog)
    assert stall["stalled"] >= 70
    assert stall["cpu"] >= 70  # it was this thread's own work
    assert 0 < stall["gc"] <= stall["cpu"]


async def test_a_stall_off_the_cpu_is_logged_as_such(caplog: pytest.LogCaptureFixture) -> None:
    async with probe_running():
        block_the_loop(0.08)  # asleep: the kernel has the thread
    stall = logged_stall(caplog)
    assert stall["stalled"] >= 70
    assert stall["cpu"] < 20
    assert stall["blocked"] >= 1  # a system call that slept
    assert stall["gc"] == 0


async def test_a_stall_waiting_for_the_gil_shows_the_time_of_the_thread_that_held_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopping = threading.Event()

    def hold_the_gil() -> None:  # pure Python: gives the GIL up only when asked to
        while not stopping.is_set():
            sum(range(100))

    hog = threading.Thread(target=hold_the_gil)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.1)  # a waiting thread asks for the GIL after 100 ms
    try:
        async with probe_running():
            hog.start()
            await asyncio.sleep(0.3)
            stopping.set()
    finally:
        stopping.set()
        if hog.is_alive():
            hog.join()
        sys.setswitchinterval(switch_interval)
    stall = logged_stall(caplog)
    assert stall["stalled"] >= 70
    assert stall["cpu"] < stall["stalled"] / 3
    # The holder ran for the stall, less what a busy 2-core machine took of its core.
    assert stall["others"] >= stall["stalled"] / 3
    assert stall["blocked"] >= 1  # waiting for the GIL


@pytest.mark.skipif(
    not os.path.exists("/proc/thread-self/schedstat"), reason="no run-queue time here"
)
async def test_a_stall_waiting_for_a_cpu_is_logged_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Six processes that never sleep share the loop's one CPU: 10 ms of its own work
    takes about 70."""
    affinity = os.sched_getaffinity(0)
    cpu = min(affinity)
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    hogs = [await asyncio.create_subprocess_exec(sys.executable, "-c", spin) for _ in range(6)]
    try:
        await asyncio.sleep(0.3)  # started and spinning
        os.sched_setaffinity(0, {cpu})
        async with probe_running():
            began = time.thread_time()
            while time.thread_time() - began < 0.01:
                pass
    finally:
        os.sched_setaffinity(0, affinity)
        for hog in hogs:
            hog.kill()
            await hog.wait()
    stall = logged_stall(caplog)
    assert stall["stalled"] >= 30
    assert stall["waited"] >= stall["stalled"] / 2
    assert stall["preempted"] >= 1


def crunch_numbers(seconds: float) -> None:
    began = time.thread_time()
    while time.thread_time() - began < seconds:
        sum(range(1000))


async def test_a_stall_is_logged_with_where_the_loop_was_in_the_middle_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with probe_running():
        # Long enough that the watch thread, woken every 10 ms, gets the CPU and the GIL
        # past its 32 ms mark even on a loaded machine (at 0.1 s it once did not).
        crunch_numbers(0.4)
    (record,) = [r for r in caplog.records if "event loop stalled" in r.getMessage()]
    where = record.getMessage().split("in the middle of it: ")[1]
    innermost, caller = where.split(" < ")[:2]
    assert innermost.startswith("test_loop_lag.py:") and innermost.endswith(" crunch_numbers")
    assert caller.endswith(" test_a_stall_is_logged_with_where_the_loop_was_in_the_middle_of_it")


async def test_a_stall_spent_faulting_in_memory_counts_its_page_faults_and_kernel_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with probe_running():
        began = time.monotonic()
        while time.monotonic() - began < 0.08:
            bytearray(64 << 20)  # fresh pages each time, zeroed: the kernel faults them in
    stall = logged_stall(caplog)
    assert stall["faults"] > 1000
    assert stall["kernel"] > 0
