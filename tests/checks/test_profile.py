"""checks.profile's reading of py-spy's samples and of /proc (pure; no server started)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

from checks.profile import (
    OTHER,
    REPO,
    stage_of,
    stages,
    table_rows,
    thread_name,
    thread_seconds,
)

ROOT = (
    f"thread (7): MainThread;0x7f (/usr/lib/libc.so.6);<module> ({REPO}/server/__main__.py:112)"
    f";run ({REPO}/.venv/lib/python3.11/site-packages/uvloop/__init__.py:92)"
)


def test_a_sample_goes_to_the_innermost_frame_of_ours() -> None:
    stack = (
        f"{ROOT};_serve ({REPO}/server/intake.py:90);Decide ({REPO}/server/servicer.py:80)"
        f";score ({REPO}/server/model_client.py:120)"
        f";__call__ ({REPO}/.venv/lib/python3.11/site-packages/grpc/aio/_call.py:300)"
        ";0x7f (/x/site-packages/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so)"
    )
    assert stage_of(stack) == "model call (client, batching, breaker)"
    assert stage_of(stack.rsplit(";score", 1)[0]) == (
        "decision (servicer, engine, ladder, validation)"
    )
    assert stage_of(f"{ROOT};_serve ({REPO}/server/intake.py:90)") == (
        "call slots (grpc.aio serving)"
    )
    assert stage_of(f"{ROOT};write ({REPO}/server/audit/journal.py:40)") == "audit record"
    assert stage_of(f"{ROOT};f ({REPO}/proto/decision/v1/x.py:1)") == "other code of ours"


def test_a_sample_with_none_of_ours_goes_to_the_library_at_its_leaf() -> None:
    # The entry point and the checkout's virtualenv are not stages.
    grpc_leaf = f"{ROOT};0x7f (/x/site-packages/grpc/_cython/cygrpc.cpython-311.so)"
    assert stage_of(grpc_leaf) == "gRPC, outside our calls"
    assert stage_of(ROOT) == "event loop (uvloop, asyncio)"
    assert stage_of("thread (7): MainThread;0x7f (/usr/lib/libc.so.6)") == OTHER


def test_stages_count_the_main_threads_samples_only() -> None:
    raw = "\n".join([
        f"{ROOT};_serve ({REPO}/server/intake.py:90) 3",
        f"{ROOT.replace('MainThread', 'audit-journal-sync')};w ({REPO}/server/audit/j.py:1) 5",
        f"{ROOT} 2",
        "not a sample line",
    ])  # fmt: skip
    assert stages(raw) == Counter(
        {"call slots (grpc.aio serving)": 3, "event loop (uvloop, asyncio)": 2}
    )


def test_table_rows_split_the_loops_cpu_by_its_samples() -> None:
    us = {"process": 600.0, "event loop": 400.0, "thread event_engine": 80.0, "thread x": 0.2}
    rows = table_rows("Y", Counter({"a": 3, "b": 1}), us, shipper=60.0, model=230.0)
    assert rows == [
        ("Y", "event loop, all", "4 samples", "400"),
        ("Y", "event loop: a", "75.0 %", "300"),
        ("Y", "event loop: b", "25.0 %", "100"),
        ("Y", "thread event_engine", "", "80"),
        ("Y", "threads that ended during the run", "", "120"),  # 600 - 400 - 80.2
        ("Y", "audit shipper (process)", "", "60"),
        ("Y", "model server (process)", "", "230"),
    ]


def test_a_pools_threads_share_a_row_and_unnamed_threads_another() -> None:
    assert thread_name("event_engine-3", "python") == "thread event_engine"
    assert thread_name("default-executo", "python") == "thread default-executo"
    assert thread_name("grpc_global_tim", "python") == "thread grpc_global_tim"
    assert thread_name("python", "python") == "other threads (Python names none)"


def test_thread_seconds_reads_each_threads_cpu_from_proc() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    before = thread_seconds(os.getpid())
    worker = threading.Thread(target=spin, name="spinner-1")
    began = time.monotonic()
    worker.start()
    try:
        time.sleep(0.5)
        after = thread_seconds(os.getpid())
    finally:
        stop.set()
        worker.join()
    wall = time.monotonic() - began
    assert "event loop" in after  # the main thread, as a server's is its loop's
    # Python 3.11 names no thread in the kernel: the spinner shares the unnamed row. It
    # ran at most the wall time (seconds, not clock ticks) and, on a busy machine, a
    # good part of it.
    other = "other threads (Python names none)"
    spun = after[other] - before.get(other, 0.0)
    assert 0.05 <= spun <= wall + 0.05
    # The whole process's counts every thread (the kernel scales it: a few ticks apart).
    assert after["process"] - before["process"] >= spun / 2
