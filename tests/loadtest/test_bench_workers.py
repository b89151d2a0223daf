"""bench_workers' summaries over made-up load results, its argument parsing, and its
CPU reading of a real process tree."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil  # type: ignore[import-untyped]  # no stubs in the virtualenv
import pytest

from loadtest.bench_workers import (
    Cell,
    Row,
    TreeCpu,
    best,
    cpu_list,
    float_list,
    int_list,
    open_loop,
    pin,
    scaling,
    setting,
)
from loadtest.loadgen import Mode
from tests.loadtest.made_up import load_result


def row(
    path: str, workers: int, mode: Mode, load: float, *, ok: int, model: float = 1.0, late: int = 0
) -> Row:
    result = load_result(mode, load, ok=ok, model=model, late=late, latency_us=4_000)
    return Row(Cell(path, workers, mode, load), result, server_cores=1.0, torchserve_cores=0.5)


ROWS = [
    row("D", 1, "closed", 16, ok=1_000),
    # More answers, but half from the ladder: 900 the model made, under the 1,000 above.
    row("D", 1, "closed", 32, ok=1_800, model=0.5),
    row("D", 1, "open", 2_000, ok=2_000),  # open loop never sets the capacity
    row("F", 1, "closed", 16, ok=1_500),
    row("D", 2, "closed", 32, ok=1_900, model=0.9),
    row("D", 2, "open", 1_710, ok=1_500, model=0.6, late=210),
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


def test_open_loop_rows_give_load_against_capacity_late_answers_and_model_share() -> None:
    lines = open_loop(ROWS).splitlines()
    assert lines[2:] == [
        "| 1 | 2,000 | 2.00 | 0 | 100.0 % | 4.00 |",
        "| 2 | 1,710 | 1.00 | 210 | 60.0 % | 4.00 |",
    ]


@pytest.mark.parametrize("text", ["", "0,1", "-1", "a,b"])
def test_lists_refuse_what_is_not_positive(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        int_list(text)
    with pytest.raises(argparse.ArgumentTypeError):
        float_list(text)


def test_lists_read_comma_separated_values() -> None:
    assert int_list("1,2, 8") == [1, 2, 8]
    assert float_list("0.5,1") == [0.5, 1.0]


def test_server_settings_are_decision_variables_with_a_value() -> None:
    assert setting("DECISION_DECISION__OVERLOAD_ACTION=reject") == (
        "DECISION_DECISION__OVERLOAD_ACTION",
        "reject",
    )
    assert setting("DECISION_X=") == ("DECISION_X", "")
    for text in ("PATH=/tmp", "DECISION_X"):
        with pytest.raises(argparse.ArgumentTypeError):
            setting(text)


def test_tree_cpu_counts_a_child_process_of_the_root() -> None:
    # The root (a shell) idles while its child burns CPU: the tree's seconds must grow.
    burn = (
        f"{sys.executable} -c 'import time; end = time.time() + 0.6\nwhile time.time() < end: pass'"
    )
    root = subprocess.Popen(["/bin/sh", "-c", f"{burn}; sleep 5"])
    try:
        tree = TreeCpu(root.pid)
        before = tree.seconds()
        time.sleep(0.4)
        assert tree.seconds() - before > 0.2
    finally:
        root.kill()
        root.wait()
    assert TreeCpu(None).seconds() == 0.0


def test_pin_puts_every_thread_of_the_tree_on_the_cpus() -> None:
    # A shell whose child runs three threads: affinity is per thread, so pinning only
    # the processes would leave two of them free.
    threads = (
        "import threading, time;"
        " [threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(2)];"
        " time.sleep(30)"
    )
    root = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c '{threads}'; true"])
    try:
        deadline = time.monotonic() + 10
        while True:
            tasks = [t for c in psutil.Process(root.pid).children() for t in c.threads()]
            if len(tasks) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(tasks) == 3
        assert pin(root.pid, [0]) == 4  # the shell's one thread and the child's three
        for task in tasks:
            assert os.sched_getaffinity(task.id) == {0}
    finally:
        for proc in psutil.Process(root.pid).children(recursive=True):
            proc.kill()
        root.kill()
        root.wait()


def test_cpu_list_takes_only_cpus_this_process_may_use() -> None:
    assert cpu_list("0") == [0]
    for text in ("", "x", "99999"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(text)
