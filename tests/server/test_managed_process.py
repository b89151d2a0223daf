"""ManagedProcess: a process group of its own in the caller's session, so that ``nice``
weighs a background process against the rest of the stack; ``stop_all`` stops several
side by side."""

from __future__ import annotations

import os
from pathlib import Path

from core.processes import ManagedProcess, live_group_members, niced, stop_all
from tests.conftest import wait_for


def autogroup(pid: int | str) -> str:
    """The process's scheduling autogroup and that group's nice, as the kernel prints
    them; empty where the process is in a cgroup of its own (a container), where the
    kernel uses no autogroup."""
    return Path(f"/proc/{pid}/autogroup").read_text().strip()


def test_a_niced_process_shares_our_scheduling_group_and_runs_niced(tmp_path):
    proc = ManagedProcess(
        "sleeper",
        niced(["sleep", "30"], 10),
        cwd=tmp_path,
        log_path=tmp_path / "sleeper.log",
    )
    with proc:
        pid = proc.pid
        assert pid is not None
        assert os.getpgid(pid) == pid  # stop() signals its group, and only it
        assert os.getsid(pid) == os.getsid(0)
        # `nice` sets the priority, then execs sleep: the same process.
        wait_for(lambda: os.getpriority(os.PRIO_PROCESS, pid) == 10, 5)
        if Path("/proc/self/autogroup").exists():
            # A session of its own would be an autogroup of its own, where nice 10
            # would only weigh it against itself.
            assert autogroup(pid) == autogroup("self")
    assert not live_group_members(pid)


# A process that notes when SIGTERM reaches it and when it has drained (a second later).
DRAINING = (
    "trap 'date +%s.%N > termed; sleep 1; date +%s.%N > drained; exit 0' TERM;"
    " touch ready; while true; do sleep 0.05; done"
)


def test_stop_all_signals_every_process_before_waiting_for_any(tmp_path):
    folders = [tmp_path / f"drainer-{i}" for i in range(3)]
    procs = []
    for folder in folders:
        folder.mkdir()
        procs.append(
            ManagedProcess(
                folder.name, ["bash", "-c", DRAINING], cwd=folder, log_path=folder / "log"
            )
        )
        procs[-1].start()
    wait_for(lambda: all((folder / "ready").exists() for folder in folders), 10)
    pids = [proc.pid for proc in procs]
    stop_all(procs)
    termed = [float((folder / "termed").read_text()) for folder in folders]
    drained = [float((folder / "drained").read_text()) for folder in folders]
    # One after another, each would have had SIGTERM after the one before had drained.
    assert max(termed) < min(drained), (termed, drained)
    assert not any(live_group_members(pid) for pid in pids if pid is not None)
