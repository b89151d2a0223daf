"""bench_workers' summaries over made-up load results, its argument parsing, and its
CPU reading of a real process tree."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the virtualenv
import pytest

from loadtest.bench_workers import (
    Cell,
    Row,
    best,
    cores_during,
    cpu_list,
    default_processes,
    default_workers,
    float_list,
    int_list,
    kept_or_temporary,
    listeners,
    open_loop,
    pin,
    scaling,
    setting,
    started_on,
)
from loadtest.loadgen import LoadResult, Mode
from loadtest.soak_probe import group_cpu_seconds
from tests.loadtest.made_up import load_result


def row(
    path: str,
    workers: int,
    mode: Mode,
    load: float,
    *,
    ok: int,
    model: float = 1.0,
    late: int = 0,
    refused: int = 0,
    unknown: int = 0,
) -> Row:
    result = load_result(
        mode, load, ok=ok, model=model, late=late, latency_us=4_000, refused=refused
    )
    if unknown:
        result.workers[0].errors["UNKNOWN"] = unknown
    return Row(Cell(path, workers, mode, load), result, server_cores=1.0, model_server_cores=0.5)


ROWS = [
    row("D", 1, "closed", 16, ok=1_000),
    # More answers, but half from the ladder: 900 the model made, under the 1,000 above.
    row("D", 1, "closed", 32, ok=1_800, model=0.5),
    row("D", 1, "open", 2_000, ok=2_000),  # open loop never sets the capacity
    row("F", 1, "closed", 16, ok=1_500),
    row("D", 2, "closed", 32, ok=1_900, model=0.9),
    row("D", 2, "open", 1_710, ok=1_500, model=0.6, late=210, refused=40, unknown=2),
    row("F", 2, "closed", 32, ok=2_700),
]


def test_capacity_counts_the_model_answers_of_closed_loop_cells_only() -> None:
    assert best(ROWS, "D", 1) == pytest.approx(1_000)
    assert best(ROWS, "D", 2) == pytest.approx(1_710)
    assert best(ROWS, "F", 2) == pytest.approx(2_700)  # the ladder's answers all count
    assert best(ROWS, "D", 4) == 0.0  # not measured


def test_scaling_gives_each_worker_count_against_one_worker() -> None:
    lines = scaling(ROWS, [1, 2]).splitlines()
    assert lines[2] == "| 1 | 1,000 | 1.00 x | 1,500 | 1.00 x |"
    assert lines[3] == "| 2 | 1,710 | 1.71 x | 2,700 | 1.80 x |"


def test_scaling_names_the_worker_count_it_compares_with() -> None:
    lines = scaling(ROWS, [2]).splitlines()
    assert lines[0] == "| workers | D: model answers/s | D vs 2 | F: ladder answers/s | F vs 2 |"
    assert lines[2] == "| 2 | 1,710 | 1.00 x | 2,700 | 1.00 x |"


def test_open_loop_rows_give_load_against_capacity_late_answers_and_model_share() -> None:
    lines = open_loop(ROWS).splitlines()
    assert lines[2:] == [
        "| 1 | 2,000 | 2.00 | 0 | 0 | - | 0 | 100.0 % | 4.00 | - |",
        # Refused calls are not late, and not hidden either; the model's share is of
        # every call: 900 of 1,752.
        "| 2 | 1,710 | 1.00 | 210 | 40 | 1.00 | UNKNOWN 2 | 51.4 % | 4.00 | - |",
    ]


def test_spread_gives_the_least_and_most_busy_worker() -> None:
    one = row("D", 2, "open", 1_000, ok=1_000)
    assert one.spread() == "-"  # no worker measured on its own (E, T)
    spread = Row(one.cell, one.result, 1.0, 0.5, (0.62, 0.91, 0.35), (9, 12, 3))
    assert spread.spread() == "0.35 to 0.91 cores, 3 to 12 connections"
    uncounted = Row(one.cell, one.result, 1.0, 0.5, (0.62, 0.91), ())  # the cell ended first
    assert uncounted.spread() == "0.62 to 0.91 cores"
    assert spread.figures()["worker_connections"] == [9, 12, 3]


@pytest.mark.parametrize("text", ["", "0,1", "-1", "a,b"])
def test_lists_refuse_what_is_not_positive(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        int_list(text)
    with pytest.raises(argparse.ArgumentTypeError):
        float_list(text)


def test_lists_read_comma_separated_values() -> None:
    assert int_list("1,2, 8") == [1, 2, 8]
    assert float_list("0.5,1") == [0.5, 1.0]


def test_defaults_follow_the_cpus_each_side_may_use() -> None:
    assert default_workers(2) == [1, 2]  # --server-cpus 0,1: no 4 or 8 workers on two CPUs
    assert default_workers(16) == [1, 2, 4, 8]
    assert default_workers(0) == [1]
    assert [default_processes(n) for n in (1, 6, 13, 40)] == [2, 3, 6, 8]


def test_server_settings_are_decision_variables_with_a_value() -> None:
    assert setting("DECISION_SERVER__MAX_CONCURRENT_STREAMS=8") == (
        "DECISION_SERVER__MAX_CONCURRENT_STREAMS",
        "8",
    )
    assert setting("DECISION_X=") == ("DECISION_X", "")
    for text in ("PATH=/tmp", "DECISION_X"):
        with pytest.raises(argparse.ArgumentTypeError):
            setting(text)


def test_group_cpu_seconds_count_a_child_process_of_the_leader() -> None:
    # The leader (a shell) idles while its child burns 0.5 s of CPU (not of wall time,
    # which a busy machine would spend waiting) and then stays: the group's seconds must
    # grow by about that.
    burn = "import time\nwhile time.process_time() < 0.5: pass\ntime.sleep(30)"
    root = subprocess.Popen(
        ["/bin/sh", "-c", f"{sys.executable} -c '{burn}'; true"], process_group=0
    )
    try:
        deadline = time.monotonic() + 20
        while group_cpu_seconds([root.pid])[0] < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_cpu_seconds([root.pid])[0] >= 0.4
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()
    assert group_cpu_seconds([None]) == [0.0]


ALLOWED = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(
    len(ALLOWED) < 2, reason="pinning to one of one CPU would change nothing"
)


def running_threads(three_threads: str) -> subprocess.Popen[bytes]:
    """A shell whose child runs three threads (returned once they run)."""
    root = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c '{three_threads}'; true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(c.num_threads() for c in psutil.Process(root.pid).children()) == 3:
            return root
        time.sleep(0.05)
    root.kill()
    raise AssertionError("the child's three threads did not start")


THREE_THREADS = (
    "import threading, time;"
    " [threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(2)];"
    " time.sleep(30)"
)


def end(root: subprocess.Popen[bytes]) -> None:
    for proc in psutil.Process(root.pid).children(recursive=True):
        proc.kill()
    root.kill()
    root.wait()


@needs_two_cpus
def test_pin_puts_every_thread_of_the_tree_on_the_cpus() -> None:
    # Affinity is per thread: pinning only the processes would leave two threads free.
    root = running_threads(THREE_THREADS)
    try:
        assert pin(root.pid, [ALLOWED[-1]]) == 4  # the shell's one thread, the child's three
        tasks = [t for c in psutil.Process(root.pid).children() for t in c.threads()]
        assert [os.sched_getaffinity(t.id) for t in tasks] == [{ALLOWED[-1]}] * 3
    finally:
        end(root)


@needs_two_cpus
def test_started_on_starts_processes_on_the_cpus_and_leaves_the_caller_as_it_was() -> None:
    before = os.sched_getaffinity(0)
    with started_on([ALLOWED[0]]):
        root = running_threads(THREE_THREADS)
    try:
        assert os.sched_getaffinity(0) == before
        tasks = [t for c in psutil.Process(root.pid).children() for t in c.threads()]
        assert [os.sched_getaffinity(t.id) for t in tasks] == [{ALLOWED[0]}] * 3
    finally:
        end(root)


LISTEN = (
    "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
    " print(s.getsockname()[1], flush=True)\n"
)


@contextlib.contextmanager
def listening_script(then: str) -> Iterator[tuple[int, int]]:
    """A Python process (a process group of its own) listening on a free loopback port,
    then running ``then``: its pid and the port. Killed on exit."""
    with subprocess.Popen(
        [sys.executable, "-c", LISTEN + then], stdout=subprocess.PIPE, process_group=0
    ) as server:
        try:
            assert server.stdout is not None
            yield server.pid, int(server.stdout.readline())
        finally:
            server.kill()


def test_listeners_counts_the_processes_listening_on_the_port() -> None:
    with listening_script("time.sleep(30)") as (pid, port):
        assert listeners(pid, port) == 1
        assert listeners(pid, port - 1) == 0


def test_cores_during_counts_each_process_and_its_connections_midway() -> None:
    # A server that takes connections and burns CPU while it holds them; the run opens
    # two, holds them past the midpoint and closes them.
    burn_holding_two = (
        "held = [s.accept() for _ in range(2)]; t = time.process_time()\n"
        "while time.process_time() < t + 0.3: pass\ntime.sleep(30)"
    )
    with listening_script(burn_holding_two) as (pid, port):

        def run() -> LoadResult:
            with socket.create_connection(("127.0.0.1", port)):
                with socket.create_connection(("127.0.0.1", port)):
                    time.sleep(1.0)
            return load_result("closed", 2, ok=1)

        _, busy = cores_during([pid], run, pids=[pid], port=port, midpoint_s=0.5)
        assert busy.connections == [2]
        assert busy.process_cores[0] > 0.1  # its 0.3 s of CPU in about a second
        # Read a moment apart, on a machine that may be busy.
        assert busy.group_cores[0] == pytest.approx(busy.process_cores[0], abs=0.1)


def test_cores_during_leaves_the_warm_up_out() -> None:
    # A server that burns 0.3 s of CPU on each connection it takes; each run connects at
    # its start (its warm-up) and then waits a second.
    burn_on_each = (
        "while True:\n held = s.accept(); t = time.process_time()\n"
        " while time.process_time() < t + 0.3: pass"
    )
    with listening_script(burn_on_each) as (pid, port):

        def run() -> LoadResult:
            with socket.create_connection(("127.0.0.1", port)):
                time.sleep(1.0)
            return load_result("closed", 1, ok=1)

        _, whole = cores_during([pid], run, pids=[pid])
        assert whole.process_cores[0] > 0.1
        _, after_warmup = cores_during([pid], run, pids=[pid], measured_from_s=0.6)
        assert after_warmup.process_cores[0] < 0.05
        assert after_warmup.group_cores[0] < 0.05


def test_cpu_list_takes_only_cpus_this_process_may_use() -> None:
    assert cpu_list(str(ALLOWED[0])) == [ALLOWED[0]]
    for text in ("", "x", str(max(ALLOWED) + 1)):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(text)


def test_a_kept_run_folder_stays_and_a_temporary_one_goes(tmp_path: Path) -> None:
    with kept_or_temporary(tmp_path / "kept") as run_dir:
        (run_dir / "server.log").write_text("kept")
    assert (tmp_path / "kept" / "server.log").read_text() == "kept"
    with kept_or_temporary(None) as run_dir:
        (run_dir / "server.log").write_text("gone")
    assert not run_dir.exists()
