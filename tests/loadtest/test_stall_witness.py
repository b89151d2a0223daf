"""The stall witness: a process held off the CPU writes down how long it waited."""

from __future__ import annotations

import os
import signal
import time

from loadtest.soak_probe import StallWitness
from tests.conftest import REPO


def test_a_witness_held_off_the_cpu_reports_the_stall_and_only_once(tmp_path) -> None:
    witness = StallWitness(tmp_path, REPO)
    witness.start()
    try:
        time.sleep(1.0)  # the interpreter starts and settles
        witness.take()
        pid = witness.pid
        assert pid is not None
        os.killpg(pid, signal.SIGSTOP)  # what a machine with no free core does to it
        time.sleep(0.15)
        os.killpg(pid, signal.SIGCONT)
        time.sleep(0.3)
        stalls = witness.take()
        assert [s for s in stalls if s.late_ms >= 120], stalls
        assert abs(max(s.at_unix_s for s in stalls) - time.time()) < 1.0
        assert witness.take() == []  # handed over once
    finally:
        witness.stop()
