"""Two stacks never start on the same port: a stack claims its ports (an exclusive
``flock`` per port) before it binds them, and the kernel drops the claims of a process
that dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import pytest

from core.processes import ProcessStartError
from localstack import port_claims
from localstack import stack as localstack
from localstack.port_claims import PortClaims
from localstack.stack import LocalStack

CLAIM_AND_WAIT = """
import sys, time
from pathlib import Path
from localstack.port_claims import PortClaims
claims = PortClaims(Path(sys.argv[1]))
assert claims.claim([int(p) for p in sys.argv[2:]]) == {}
print("claimed", flush=True)
time.sleep(60)
"""


@pytest.fixture
def claims_dir(tmp_path, monkeypatch):
    """A folder of claims of this test's own, and no real port in use: only the claims
    decide."""
    folder = tmp_path / "claims"
    monkeypatch.setattr(port_claims, "CLAIMS_DIR", folder)
    monkeypatch.setattr(LocalStack, "busy_ports", lambda self: [])
    return folder


def test_a_claim_refuses_every_other_claim_on_any_of_its_ports(claims_dir):
    first, second, third = PortClaims(), PortClaims(), PortClaims()
    try:
        assert first.claim([40001, 40002]) == {}
        assert second.claim([40000, 40002, 40003]) == {40002: f"pid {os.getpid()}"}
        assert second.held == []  # all or none: 40000 was not kept
        assert third.claim([40000, 40003]) == {}
        assert PortClaims().claimed_elsewhere([40001, 40003, 40004]) == [40001, 40003]
        assert first.claimed_elsewhere([40001, 40002]) == []  # its own are not another's

        first.release()
        assert second.claim([40002]) == {}
    finally:
        for claims in (first, second, third):
            claims.release()


def test_a_dead_claimer_leaves_no_claim(claims_dir):
    with subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_WAIT, str(claims_dir), "40011", "40012"],
        cwd=localstack.REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as claimer:
        try:
            assert claimer.stdout is not None
            assert claimer.stdout.readline().strip() == "claimed"
            assert PortClaims().claim([40012]) == {40012: f"pid {claimer.pid}"}
        finally:
            claimer.send_signal(signal.SIGKILL)  # no release: the kernel drops the locks
            claimer.wait(timeout=10)
    assert PortClaims().claim([40011, 40012]) == {}


def test_a_stack_on_claimed_ports_is_refused_before_it_starts_anything(claims_dir, tmp_path):
    running = LocalStack(tmp_path / "a", 7000)
    assert running.claim_ports() == ""
    try:
        second = LocalStack(tmp_path / "b", 7000)
        refused = second.claim_ports()
        assert refused.startswith("ports another stack claims: ")
        assert f"(pid {os.getpid()})" in refused

        async def start_and_stop() -> None:
            try:
                await second.start()
            finally:  # a regression would have started processes: stop them
                await second.stop()

        with pytest.raises(ProcessStartError, match="another stack claims"):
            asyncio.run(start_and_stop())
        assert second.processes == {}
    finally:
        running._claims.release()


def test_a_claimed_offset_is_never_drawn(claims_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(localstack, "SECOND_STACK_OFFSETS", [3000, 6000])
    monkeypatch.setattr(localstack, "outgoing_ports", lambda: range(0))
    claimed = LocalStack(tmp_path, 3000)
    assert claimed.claim_ports() == ""
    try:
        assert {LocalStack.free_offset(tmp_path) for _ in range(20)} == {6000}
    finally:
        claimed._claims.release()
    assert LocalStack.free_offset(tmp_path) in (3000, 6000)


def test_a_look_at_a_port_does_not_refuse_a_claim_made_meanwhile(claims_dir):
    """``free_offset`` in one process locks a port's file for a moment to see whether it
    is claimed; a stack claiming that port in that moment waits it out."""
    earlier = PortClaims()
    assert earlier.claim([40021]) == {}  # the file exists from now on
    earlier.release()
    fd = PortClaims()._open(40021, create=False)
    assert fd is not None
    assert port_claims._lock(fd, grace_s=0.0)  # a look, held ...
    look_ends = threading.Timer(0.05, os.close, (fd,))  # ... for 50 ms
    look_ends.start()
    claims = PortClaims()
    try:
        assert claims.claim([40021]) == {}
    finally:
        look_ends.join()
        claims.release()


def test_make_run_refuses_ports_another_stack_claims(tmp_path):
    """The stack's own command, as ``make run`` starts it, says who holds the ports."""
    claims = PortClaims(tmp_path / "decision-stack-ports")  # TMPDIR for the child below
    offset = 4000
    assert claims.claim(LocalStack(tmp_path, offset).ports()) == {}
    result = run_localstack(tmp_path, offset)
    claims.release()
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"(pid {os.getpid()})" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def run_localstack(tmp_path, offset):
    return subprocess.run(
        [sys.executable, "-m", "localstack", "--run-dir", str(tmp_path / "run"),
         "--port-offset", str(offset), "--models", str(tmp_path)],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        cwd=localstack.REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
