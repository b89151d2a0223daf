"""ManagedProcess: a process group of its own in the caller's session, so that ``nice``
weighs a background process against the rest of the stack."""

from __future__ import annotations

import os
from pathlib import Path

from core.processes import ManagedProcess, live_group_members, niced
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
