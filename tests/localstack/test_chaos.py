"""The local stack's chaos service over its socket, acting on real (sleeping) processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from core.chaos import ChaosRequest, ask
from core.processes import ManagedProcess
from localstack.chaos import ChaosService, ChaosTarget


def _state(proc: ManagedProcess) -> str:
    """The process's state letter (R, S, T when stopped, ...)."""
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


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
        assert _state(proc) == "T"
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
