"""The test run itself, stopped by SIGTERM (how CI cancels a job): every fixture's process
is stopped first, as on Ctrl-C, though it runs in a process group of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from core.processes import live_group_members
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
    written = Path("{pid_file}.tmp")
    written.write_text(str(sleeper.pid))
    written.rename("{pid_file}")  # whole, or not there
    time.sleep(120)
"""


def test_sigterm_stops_the_session_fixtures_processes(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(textwrap.dedent(INNER).replace("{pid_file}", str(pid_file)))
    output = tmp_path / "pytest.out"
    # The suite's own configuration (pytest-timeout, warnings as errors), none of this
    # run's PYTEST_* variables (an -m or -k there would deselect the test).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    with output.open("wb") as out:
        pytest_run = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-c", str(REPO / "pyproject.toml"),
             "--rootdir", str(tmp_path), "-p", "tests.conftest", "-p", "no:cacheprovider",
             str(test_file)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    sleeper = 0
    try:
        wait_for(lambda: pid_file.exists() or pytest_run.poll() is not None, 60)
        assert pytest_run.poll() is None, output.read_text(errors="replace")
        sleeper = int(pid_file.read_text())
        assert live_group_members(sleeper)
        pytest_run.send_signal(signal.SIGTERM)
        pytest_run.wait(timeout=30)
        assert not live_group_members(sleeper), output.read_text(errors="replace")
        assert "KeyboardInterrupt" in output.read_text(errors="replace")
    finally:
        if pytest_run.poll() is None:
            os.killpg(pytest_run.pid, signal.SIGKILL)
            pytest_run.wait()
        if sleeper and live_group_members(sleeper):
            os.killpg(sleeper, signal.SIGKILL)
