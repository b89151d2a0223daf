"""The local stack's chaos service over its socket, acting on real (sleeping) processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from core.chaos import ChaosRequest, ask
from core.processes import ManagedProcess, free_port, listening, start_ready
from localstack.chaos import ChaosService, ChaosTarget
from localstack.redis_server import start_redis


def _state(proc: ManagedProcess) -> str:
    """The process's state letter (R, S, T when stopped, ...)."""
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _stopped(proc: ManagedProcess, timeout_s: float = 2.0) -> bool:
    """Whether the process shows as stopped within ``timeout_s``: SIGSTOP takes effect
    when the process is next scheduled, which a busy machine delays (CI read R once)."""
    deadline = time.monotonic() + timeout_s
    while _state(proc) != "T":
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _ask(run_dir: Path, action: str, target: str) -> tuple[bool, str]:
    answer = await asyncio.to_thread(ask, run_dir, ChaosRequest(action, target), 10.0)
    return answer.ok, answer.message


async def test_pause_resume_kill_restart_and_refusals(tmp_path):
    proc = ManagedProcess("primary", ["sleep", "60"], cwd=tmp_path, log_path=tmp_path / "p.log")
    failing_starts: list[str] = []

    def restart() -> None:
        if failing_starts:
            raise RuntimeError(failing_starts.pop())
        proc.start()

    proc.start()
    service = ChaosService(tmp_path, {"primary": ChaosTarget(proc, "127.0.0.1:7070", restart)})
    await service.start()
    try:
        assert (tmp_path / "chaos.sock").stat().st_mode & 0o777 == 0o600
        ok, message = await _ask(tmp_path, "pause", "primary")
        assert ok and message.startswith("paused primary (127.0.0.1:7070, pid ")
        assert await _stopped(proc)
        assert (await _ask(tmp_path, "resume", "primary"))[0]
        assert _state(proc) != "T"

        assert (await _ask(tmp_path, "kill", "primary"))[0]
        assert not proc.running()
        ok, message = await _ask(tmp_path, "pause", "primary")
        assert not ok
        assert (
            message
            == "primary is not running (killed or stopped): decisionctl chaos restart primary"
        )

        failing_starts.append("no model loaded")
        ok, message = await _ask(tmp_path, "restart", "primary")
        assert (ok, message) == (False, "restart primary failed: no model loaded")
        ok, message = await _ask(tmp_path, "restart", "primary")  # the service goes on
        assert ok and proc.running()

        assert await _ask(tmp_path, "pause", "secondary") == (
            False,
            "secondary is not running in this stack",
        )
        assert await _ask(tmp_path, "stop", "primary") == (
            False,
            "primary takes pause, resume, kill, restart, slow, not stop",
        )
    finally:
        await service.stop()
        proc.stop()
    assert not (tmp_path / "chaos.sock").exists()


async def test_slow_holds_the_process_off_the_cpu_part_of_the_time_until_resumed(tmp_path):
    proc = ManagedProcess("primary", ["sleep", "60"], cwd=tmp_path, log_path=tmp_path / "p.log")
    proc.start()
    service = ChaosService(tmp_path, {"primary": ChaosTarget(proc, "x", proc.start)})
    await service.start()
    try:
        ok, message = await _ask(tmp_path, "slow", "primary")
        assert ok and "off the CPU 20 ms of every 40 ms until resumed" in message
        states = set()
        for _ in range(40):
            states.add(_state(proc))
            await asyncio.sleep(0.007)
        assert "T" in states and states - {"T"}  # stopped part of the time, not all of it
        assert (await _ask(tmp_path, "resume", "primary"))[0]
        await asyncio.sleep(0.05)
        assert _state(proc) != "T"
    finally:
        await service.stop()
        proc.stop()


@pytest.mark.integration
async def test_restart_empty_brings_redis_back_with_no_keys(tmp_path):
    port = free_port()
    proc = start_redis(port, tmp_path / "redis")
    restart = ChaosTarget(
        proc, f"127.0.0.1:{port}", lambda: start_ready(proc, listening(port), 10.0)
    )
    service = ChaosService(tmp_path, {"redis": restart})
    await service.start()
    client = redis.Redis(port=port)
    try:
        client.hset("decision:control:state", "version", 7)
        pid_before = proc.pid

        answer = await asyncio.to_thread(ask, tmp_path, ChaosRequest("restart-empty", "redis"), 30)

        assert answer.ok, answer.message
        assert answer.message.startswith(f"restarted redis (127.0.0.1:{port}, pid ")
        assert answer.message.endswith("serving again, empty (it keeps nothing on disk)")
        assert proc.running() and proc.pid != pid_before
        assert "lives in the audit store only: nothing is lifted" in answer.watch
        assert answer.watch.endswith("decisionctl status; decisionctl top")
        # Stopped by SIGTERM, a shutdown that saves when saving is configured: the stack's
        # Redis must keep nothing on disk, or "restart-empty" would not be empty.
        assert client.dbsize() == 0
        assert not [p.name for p in (tmp_path / "redis").iterdir() if not p.name.endswith(".log")]
    finally:
        client.close()
        await service.stop()
        proc.stop()


def test_only_redis_restarts_empty():
    assert ChaosRequest("restart-empty", "redis").problem() == ""
    assert ChaosRequest("restart-empty", "broker").problem() == (
        "broker takes pause, resume, stop, start, not restart-empty"
    )
    assert ChaosRequest("restart-empty", "primary").problem() == (
        "primary takes pause, resume, kill, restart, slow, not restart-empty"
    )


async def test_resume_of_a_process_never_paused_says_it_was_not_paused(tmp_path):
    proc = ManagedProcess("primary", ["sleep", "60"], cwd=tmp_path, log_path=tmp_path / "p.log")
    proc.start()
    service = ChaosService(tmp_path, {"primary": ChaosTarget(proc, "127.0.0.1:7070", proc.start)})
    await service.start()
    not_paused = (
        False,
        f"primary (127.0.0.1:7070, pid {proc.pid}) is not paused: nothing to resume",
    )
    try:
        assert await _ask(tmp_path, "resume", "primary") == not_paused
        assert (await _ask(tmp_path, "pause", "primary"))[0]
        ok, message = await _ask(tmp_path, "resume", "primary")
        assert ok and message.startswith("resumed primary")
        assert await _ask(tmp_path, "resume", "primary") == not_paused  # once is enough
        assert (await _ask(tmp_path, "slow", "primary"))[0]
        assert (await _ask(tmp_path, "resume", "primary"))[0]  # slowed: paused part-time
        assert (await _ask(tmp_path, "pause", "primary"))[0]
        assert (await _ask(tmp_path, "kill", "primary"))[0]
        assert (await _ask(tmp_path, "restart", "primary"))[0]  # a new process, running
        ok, message = await _ask(tmp_path, "resume", "primary")
        assert not ok and message.endswith("is not paused: nothing to resume")
        proc.pause()  # by hand, not through the service: as `kill -STOP` (docs/local-stack.md)
        assert await _stopped(proc)
        ok, message = await _ask(tmp_path, "resume", "primary")
        assert ok and message.startswith("resumed primary")
        assert _state(proc) != "T"
    finally:
        await service.stop()
        proc.stop()


async def test_pausing_redis_says_admin_changes_still_apply_through_the_audit_store(tmp_path):
    proc = ManagedProcess("redis", ["sleep", "60"], cwd=tmp_path, log_path=tmp_path / "r.log")
    proc.start()
    service = ChaosService(tmp_path, {"redis": ChaosTarget(proc, "127.0.0.1:16379", proc.start)})
    await service.start()
    try:
        answer = await asyncio.to_thread(ask, tmp_path, ChaosRequest("pause", "redis"), 10.0)
    finally:
        await service.stop()
        proc.stop()
    assert answer.ok, answer.message
    # docs/oncall.md: with Redis down a change still reaches every server through the
    # audit store; only the store being down refuses one.
    assert "fail" not in answer.watch and "UNAVAILABLE" not in answer.watch
    assert "admin changes still reach every server through the audit store" in answer.watch
    assert answer.watch.endswith("undo: decisionctl chaos resume redis")
