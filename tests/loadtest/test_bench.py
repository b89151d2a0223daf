"""The benchmark's verdicts and tables over made-up load results, its argument parsing,
and its reading and pinning of a real process tree."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the virtualenv
import pytest

from core.processes import ManagedProcess
from loadtest.bench import (
    PRESETS,
    Cell,
    Fleet,
    Measured,
    Results,
    Server,
    capacity_table,
    cpu_list,
    cpu_table,
    first_cells,
    listening_pids,
    numbers,
    open_loop_table,
    pairs_table,
    parse,
    path_of,
    paths_checks,
    pin,
    run_folder,
    spec_for,
    started_on,
    workers_preset,
)
from loadtest.loadgen import LoadResult
from loadtest.report import markdown_table
from loadtest.soak_probe import group_cpu_seconds
from tests.loadtest.made_up import load_result

PATHS_PRESET = PRESETS["paths"]


def runs(*, late_at_top: int = 0, model_at_top: float = 0.9, refusal_us: int = 1_000) -> Results:
    """Every path saturated at 500/s, D's open loop at 0.5-1.5 x that: 100 refused at each
    point past capacity, and the top point (750/s) as given."""
    results: Results = {}
    for path in ("E", "T", "D", "W", "F"):
        results[(path, "closed", 16.0)] = load_result("closed", 16, ok=500)
    for load in (250, 400, 500, 600):
        refused = 100 if load >= 500 else 0
        results[("D", "open", float(load))] = load_result(
            "open", load, ok=load - refused, refused=refused, refusal_us=refusal_us
        )
    results[("D", "open", 750.0)] = load_result(
        "open",
        750,
        ok=600,
        late=late_at_top,
        model=model_at_top,
        refused=150 - late_at_top,
        refusal_us=refusal_us,
    )
    return results


def measured(results: Results) -> Measured:
    return Measured(results, {cell: (1.0, 0.5) for cell in results}, 0)


def verdict(results: Results, name: str) -> str:
    return next(check.verdict() for check in paths_checks(results) if check.name.startswith(name))


LATE = "D late answers at 0.5-1.5 x capacity"
REFUSAL = "D refusal p99 as the caller sees it"
AT_1_2 = "D model share of all calls at 1.2 x capacity"


def test_past_capacity_late_answers_slow_refusals_and_a_low_model_share_are_missed() -> None:
    assert [verdict(runs(), name) for name in (LATE, REFUSAL, AT_1_2)] == ["met"] * 3
    assert verdict(runs(late_at_top=3), LATE) == "missed"
    assert verdict(runs(refusal_us=8_000), REFUSAL) == "missed"
    # 500 of 600 calls at 1.2 x: the model answered 83 % of all calls; 100 refused.
    share = next(c for c in paths_checks(runs()) if c.name == AT_1_2)
    assert share.value == pytest.approx(83.33, abs=0.01)


def test_a_low_model_share_at_0_8_or_1_2_x_capacity_is_missed() -> None:
    results = runs()
    results[("D", "open", 600.0)] = load_result("open", 600, ok=500, model=0.5, refused=100)
    assert verdict(results, AT_1_2) == "missed"
    results[("D", "open", 400.0)] = load_result("open", 400, ok=400, model=0.9)
    assert verdict(results, "D model share of all calls at 0.8 x capacity") == "missed"


def test_a_figure_the_ladder_mostly_answered_does_not_stand_for_the_model() -> None:
    results = runs()
    results[("D", "closed", 1.0)] = load_result("closed", 1, ok=100, model=0.5)
    results[("T", "closed", 1.0)] = load_result("closed", 1, ok=100)
    assert verdict(results, "D p50 - T p50").startswith("missed: the model answered only 50 %")
    assert verdict(runs(), "D p50 - T p50") == "not measured"  # no c=1 cells


WORKER_RESULTS: Results = {
    ("D1", "closed", 16.0): load_result("closed", 16, ok=1_000),
    # More answers, but half from the ladder: 900 the model made, under the 1,000 above.
    ("D1", "closed", 32.0): load_result("closed", 32, ok=1_800, model=0.5),
    ("D1", "open", 2_000.0): load_result("open", 2_000, ok=2_000),  # never the capacity
    ("F1", "closed", 16.0): load_result("closed", 16, ok=1_500),
    ("D2", "closed", 32.0): load_result("closed", 32, ok=1_900, model=0.9),
    ("F2", "closed", 32.0): load_result("closed", 32, ok=2_700),  # the ladder's all count
}


def test_capacity_counts_the_model_answers_of_closed_loop_cells_against_the_first_count() -> None:
    lines = capacity_table(measured(WORKER_RESULTS), ["D1", "D2", "F1", "F2", "D4"]).splitlines()
    assert [line.split(" | ")[:5] for line in lines[2:]] == [
        ["| D1 Decide, 1 worker", "1,000", "1.50", "667", "-"],
        ["| D2 Decide, 2 workers", "1,710", "1.50", "1,140", "1.71 x"],
        ["| F1 Decide, 1 worker, breakers open", "1,500", "1.50", "1,000", "-"],
        ["| F2 Decide, 2 workers, breakers open", "2,700", "1.50", "1,800", "1.80 x"],
    ]  # D4 not measured: no row
    assert lines[2].endswith("| c=16: 3.00 / 3.00 |")


def test_open_loop_rows_give_load_against_capacity_late_answers_and_model_share() -> None:
    results = dict(WORKER_RESULTS)
    late = load_result("open", 1_710, ok=1_500, model=0.6, late=210, refused=40)
    late.workers[0].errors["UNKNOWN"] = 2
    results[("D2", "open", 1_710.0)] = late
    preset = workers_preset([1, 2], "torchserve")
    lines = open_loop_table(measured(results), preset).splitlines()
    assert lines[2:] == [
        "| D1 | 2,000 | 2.00 | 0 | 0 | - | 0 | 100.0 % | 3.00 |",
        # Refused calls are not late, and not hidden either; the model's share is of
        # every call: 900 of 1,752.
        "| D2 | 1,710 | 1.00 | 210 | 40 | 1.00 | UNKNOWN 2 | 51.4 % | 3.00 |",
    ]


def test_cpu_rows_give_each_process_a_call_against_the_echo_server_and_each_rounds_p99() -> None:
    fast, slow = (load_result("open", 1_000, ok=1_000, latency_us=us) for us in (2_000, 4_000))
    echo: Cell = ("E", "open", 1_000.0)
    decide: Cell = ("D", "open", 1_000.0)
    results: Results = {echo: fast, decide: LoadResult.combine([fast, slow])}
    cores: dict[Cell, tuple[float, ...]] = {echo: (0.2, 0.0, 0.0), decide: (0.35, 0.05, 0.3)}
    table = cpu_table(Measured(results, cores, 0, {decide: [fast, slow]}), PATHS_PRESET)
    assert table.splitlines()[2:] == [
        "| E echo (floor) | 1000/s | 200 | 0 | 0 | 1.00 |  |",
        # The server's own: its process and its audit shipper, 400 us against 200.
        "| D Decide | 1000/s | 350 | 50 | 300 | 2.00 | 2.00 / 4.00 |",
    ]
    # A rate that is not one of the preset's fixed rates is a capacity multiple: no row.
    results[("D", "open", 777.0)] = fast
    assert len(cpu_table(Measured(results, cores, 0), PATHS_PRESET).splitlines()) == 4


def test_pairs_give_the_latency_one_path_adds_and_the_ratio_of_capacities() -> None:
    results: Results = {
        ("S", "open", 100.0): load_result("open", 100, ok=100, latency_us=1_500),
        ("D", "open", 100.0): load_result("open", 100, ok=100, latency_us=1_000),
        ("O", "closed", 1.0): load_result("closed", 1, ok=300),
        ("D", "closed", 1.0): load_result("closed", 1, ok=400),
    }
    assert pairs_table(results, [("S", "D"), ("O", "D")]) == markdown_table(
        ["pair", "at", ">p50 ms added", ">p99 ms added", ">ratio"],
        [
            ("S - D", "100/s", "+0.500", "+0.500", "1.50"),
            ("O - D", "c=1", "+0.000", "+0.000", "1.00"),
            ("O / D", "capacity", "", "", "0.75"),
        ],
    )


def test_a_key_names_a_path_or_a_worker_count() -> None:
    assert path_of("F").breakers_open and not path_of("F").from_model
    assert path_of("T").target == "torchserve" and not path_of("T").from_model
    four = path_of("D4")
    assert (four.server, four.from_model) == ("workers-4", True)
    assert path_of("F8").breakers_open and path_of("F8").server == "workers-8"


def fleet(*servers: str) -> Fleet:
    return Fleet(
        {
            name: Server(
                f"127.0.0.1:{n + 1}", ManagedProcess(name, ["true"], cwd=Path(), log_path=Path("x"))
            )
            for n, name in enumerate(servers)
        },
        "redis://127.0.0.1:2/0",
        None,
    )


def test_loads_per_worker_and_connections_within_the_stream_cap() -> None:
    preset = workers_preset([1, 4], "torchserve")
    assert ("D4", "closed", 64.0) in first_cells(preset)  # 16 callers a worker
    args = argparse.Namespace(processes=2, channels=4, burst=1, plain=False)
    both = fleet("decide", "workers-4")
    closed = spec_for(both, ("D", "closed", 64.0), PATHS_PRESET, args)
    # 32 callers a process over connections of at most the stream cap's calls each.
    assert closed.channels * closed.processes * 16 >= 64 and closed.timeout_s == 1.0
    opened = spec_for(both, ("D", "open", 500.0), PATHS_PRESET, args)
    assert (opened.channels, opened.timeout_s) == (1, 0.05)  # one a process: the contract
    spread = spec_for(both, ("D4", "open", 500.0), PATHS_PRESET, args)
    assert spread.channels == 4  # some connections to each of the server's workers
    assert spec_for(both, ("D", "closed", 1.0), PATHS_PRESET, args).processes == 1


def test_a_quick_run_keeps_the_ends_of_each_sweep() -> None:
    quick = PATHS_PRESET.quick()
    assert (quick.closed, quick.rates, quick.rounds) == ((1, 64), (250.0, 1000.0), 1)
    assert quick.capacity == PATHS_PRESET.capacity


@pytest.mark.parametrize("text", ["", "0,1", "-1", "a,b"])
def test_lists_refuse_what_is_not_positive(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        numbers(text, int)


def test_defaults_follow_the_cpus_each_side_may_use() -> None:
    args, preset = parse(["workers", "--server-cpus", str(ALLOWED[0])])
    assert args.workers == [1]  # no 2 workers on one CPU
    assert preset.paths == ("E", "T", "D1", "F1")
    args, _ = parse(["paths", "--workers", "1,2, 8", "--processes", "3"])
    assert (args.workers, args.processes) == ([1, 2, 8], 3)
    assert str(args.json).endswith(".run/bench-paths.json")


def test_group_cpu_seconds_count_a_child_process_of_the_leader() -> None:
    # The leader (a shell) idles while its child burns 0.5 s of CPU (not of wall time,
    # which a busy machine would spend waiting) and then stays: the group's seconds must
    # grow by about that. The code comes through the environment: only the child's
    # command line holds it, and its mark.
    burn = "import time  # burner\nwhile time.process_time() < 0.5: pass\ntime.sleep(30)"
    root = subprocess.Popen(
        ["/bin/sh", "-c", f'{sys.executable} -c "$BURN"; true'],
        env={**os.environ, "BURN": burn},
        process_group=0,
    )
    try:
        deadline = time.monotonic() + 20
        while group_cpu_seconds([root.pid])[0] < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_cpu_seconds([root.pid])[0] >= 0.4
        # Apart: the members whose command line holds the mark (the child), after the rest.
        rest, burner = group_cpu_seconds([root.pid], apart="# burner")
        assert rest < 0.2 and burner >= 0.4
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()
    assert group_cpu_seconds([None]) == [0.0]
    assert group_cpu_seconds([None], apart="# burner") == [0.0, 0.0]


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


def test_listening_pids_are_the_processes_listening_on_the_port() -> None:
    with listening_script("time.sleep(30)") as (pid, port):
        assert listening_pids(pid, port) == [pid]
        assert listening_pids(pid, port - 1) == []
        assert listening_pids(None, port) == []


def test_cpu_list_takes_only_cpus_this_process_may_use() -> None:
    assert cpu_list(str(ALLOWED[0])) == [ALLOWED[0]]
    for text in ("", "x", str(max(ALLOWED) + 1)):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(text)


def test_a_kept_run_folder_stays_and_a_temporary_one_goes(tmp_path: Path) -> None:
    with run_folder(tmp_path) as kept:
        (Path(kept) / "server.log").write_text("kept")
    assert (tmp_path / "server.log").read_text() == "kept"
    with run_folder(None) as temporary:
        (Path(temporary) / "server.log").write_text("gone")
    assert not Path(temporary).exists()
