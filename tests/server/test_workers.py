"""Worker processes' settings and journal folders (pure logic; the workers serving for
real are in tests/server/test_workers_serving.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.__main__ import main
from server.audit.journal import MAGIC, frame, segment_path
from server.audit.shipper import CHECKPOINT_FILE
from server.front import server_options
from server.settings import Settings
from server.workers import JournalPlan, journal_plans, worker_settings
from tests.conftest import REPO, wait_for


def leave_segment(folder: Path) -> None:
    """An unshipped record, as a killed server leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    segment_path(folder, 1).write_bytes(MAGIC + frame([b"a record"]))


def test_one_worker_writes_the_journal_folder_itself(tmp_path: Path) -> None:
    assert journal_plans(tmp_path, 1) == [JournalPlan(tmp_path, ())]


def test_several_workers_each_write_a_folder_of_their_own(tmp_path: Path) -> None:
    plans = journal_plans(tmp_path, 3)
    assert [plan.own for plan in plans] == [tmp_path / f"worker-{i}" for i in range(3)]
    assert all(plan.adopted == () for plan in plans)


def test_folders_no_worker_owns_now_are_adopted_so_nothing_is_stranded(tmp_path: Path) -> None:
    leave_segment(tmp_path)  # a single server wrote here before
    for i in range(4):  # and a run with four workers after it
        leave_segment(tmp_path / f"worker-{i}")
    plans = journal_plans(tmp_path, 2)
    adopted = [folder for plan in plans for folder in plan.adopted]
    assert sorted(adopted) == sorted([tmp_path, tmp_path / "worker-2", tmp_path / "worker-3"])
    assert len(plans[0].adopted) == 2 and len(plans[1].adopted) == 1  # shared out
    # Back to one worker: every worker folder left is adopted by it.
    (plan,) = journal_plans(tmp_path, 1)
    assert plan.own == tmp_path
    assert sorted(plan.adopted) == [tmp_path / f"worker-{i}" for i in range(4)]


def test_a_folder_with_nothing_left_to_ship_is_not_adopted(tmp_path: Path) -> None:
    (tmp_path / "worker-5").mkdir(parents=True)
    shipped = tmp_path / "worker-6"
    shipped.mkdir()
    segment_path(shipped, 3).write_bytes(MAGIC)  # opened, then everything shipped
    (shipped / CHECKPOINT_FILE).write_bytes(b'{"segment": 3, "offset": %d}' % len(MAGIC))
    assert all(plan.adopted == () for plan in journal_plans(tmp_path, 2))


def test_each_worker_gets_its_own_journal_metrics_port_and_server_id(tmp_path: Path) -> None:
    settings = Settings(
        server={"port": 50051, "metrics_port": 9464},
        audit={"journal_dir": str(tmp_path), "server_id": "pod-a"},
    )
    plans = journal_plans(tmp_path, 2)
    first, second = (worker_settings(settings, i, 2, plans[i]) for i in range(2))
    reuse_port = ("grpc.so_reuseport", 1)
    assert reuse_port in server_options(first) and reuse_port in server_options(second)
    assert (first.server.port, second.server.port) == (50051, 50051)
    assert (first.server.metrics_port, second.server.metrics_port) == (9464, 9465)
    assert (first.audit.server_id, second.audit.server_id) == ("pod-a/w0", "pod-a/w1")
    assert first.audit.journal_dir != second.audit.journal_dir
    alone = worker_settings(settings, 0, 1, journal_plans(tmp_path, 1)[0])
    assert ("grpc.so_reuseport", 0) in server_options(alone)
    # --workers 1 on settings that say 4: one process, which shares its port with nobody.
    four = Settings(server={"port": 50051, "workers": 4})
    assert ("grpc.so_reuseport", 0) in server_options(
        worker_settings(four, 0, 1, journal_plans(tmp_path, 1)[0])
    )
    assert (alone.server.metrics_port, alone.audit.server_id) == (9464, "pod-a")


def test_help_prints_usage_and_starts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "--workers" in capsys.readouterr().out


SUPERVISED = """
import os, signal, sys, time
from pathlib import Path
from server.settings import Settings
from server.workers import Supervisor

run_dir = Path(sys.argv[1])
fails_to_start = sys.argv[2:] == ["fail"]

def run(settings, adopted):
    # A stand-in worker: says it runs (pid, journal folder), then waits for SIGTERM.
    if fails_to_start:
        raise SystemExit(3)  # a port in use, say
    written = run_dir / f"{os.getpid()}.tmp"  # renamed when whole: never read half-written
    written.write_text(settings.audit.journal_dir)
    written.rename(run_dir / f"{os.getpid()}.pid")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(0.05)

settings = Settings(
    server={"port": 50999, "grace_period_s": 0.5, "metrics_port": 0},
    audit={"journal_dir": str(run_dir / "journal"), "shutdown_drain_s": 0.5},
)
sys.exit(Supervisor(settings, 2, run, startup_s=1.0).run())
"""


def test_the_supervisor_restarts_a_dead_worker_and_stops_all_on_sigterm(tmp_path: Path) -> None:
    log = (tmp_path / "supervisor.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, str(tmp_path)], cwd=REPO, stdout=log, stderr=log
    )
    try:

        def workers() -> dict[int, str]:
            return {int(p.stem): p.read_text() for p in tmp_path.glob("*.pid")}

        wait_for(lambda: len(workers()) == 2, 20)
        assert sorted(workers().values()) == [
            str(tmp_path / "journal" / f"worker-{i}") for i in range(2)
        ]
        time.sleep(1.5)  # past start-up: a death now is a crash, not a failed start
        before = workers()
        first = min(before)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(workers()) == 3, 20)  # started again ...
        (restarted,) = set(workers()) - set(before)
        assert workers()[restarted] == before[first]  # ... on the dead one's folder
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers())  # none left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_a_worker_that_fails_to_start_stops_the_server(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SUPERVISED, str(tmp_path), "fail"],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert b"exited while starting" in done.stderr
