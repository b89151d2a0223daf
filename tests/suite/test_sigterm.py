"""The test run itself, stopped by SIGTERM (how CI cancels a job): every fixture's process
is stopped first, as on Ctrl-C, though it runs in a process group of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, wait_for

INNER = """
import time
from pathlib import Path

import pytest

from core.processes import ManagedProcess


@pytest.fixture(scope="session")
def sleeper(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sleeper")
    proc = ManagedProcess("sleeper", ["sleep", "600"], cwd=folder, log_path=folder / "log")
    proc.start()
    yield proc
    proc.stop()


def test_waits(sleeper):
    Path("{pid_file}").write_text(str(sleeper.pid))
    time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_sigterm_stops_the_session_fixtures_processes(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(textwrap.dedent(INNER).replace("{pid_file}", str(pid_file)))
    pytest_run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(test_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    sleeper = 0
    try:
        wait_for(pid_file.exists, 60)
        sleeper = int(pid_file.read_text())
        assert alive(sleeper)
        pytest_run.send_signal(signal.SIGTERM)
        output, _ = pytest_run.communicate(timeout=30)
        assert not alive(sleeper), output.decode(errors="replace")
        assert b"KeyboardInterrupt" in output
    finally:
        if pytest_run.poll() is None:
            os.killpg(pytest_run.pid, signal.SIGKILL)
            pytest_run.wait()
        if sleeper and alive(sleeper):
            os.killpg(sleeper, signal.SIGKILL)
