"""The local stack's side of ``decisionctl chaos``: faults injected into its own processes.

Listens on ``<run dir>/chaos.sock`` (owner-only) while the stack runs. Each request acts on
one of the processes this stack started (a TorchServe replica, redis-server, the broker)
through the same ``ManagedProcess`` the stack stops on Ctrl-C, so a paused, slowed or
stopped process is still ended with the rest. Every answer says what to watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.chaos import (
    MAX_LINE_BYTES,
    REPLICAS,
    RESTART_EMPTY,
    ChaosAnswer,
    ChaosRequest,
    answer_line,
    parse_request,
    socket_path,
)
from core.processes import ManagedProcess
from core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

WATCH_TOP = "watch it with: decisionctl top"


@dataclass(frozen=True, slots=True)
class ChaosTarget:
    process: ManagedProcess
    address: str  # what it serves on (loopback)
    # Starts it again and waits until it serves (blocking; run in a thread).
    restart: Callable[[], object]


UNDO = {"pause": "resume", "slow": "resume", "kill": "restart", "stop": "start"}
_STARTS = ("restart", "start", RESTART_EMPTY)
WATCH_LOSS = "watch the loss and its repair with: decisionctl status; decisionctl top"


def _effect(action: str, target: str) -> str:
    """What ``action`` on ``target`` does to the decisions, in on-call's words."""
    if action == RESTART_EMPTY:
        return (
            "Redis lost every key, as after a failover, a FLUSHALL or an eviction: the "
            "consumer writes each symbol's features again with its next batch (until then "
            "each server's mirror, then ABSTAIN); the control state (kill switches, breaker "
            "overrides, canary weight) lives in the audit store only: nothing is lifted"
        )
    undone = action in ("resume", "restart", "start")
    if target == "challenger":
        if undone:
            return "shadow calls and the canary have their challenger again"
        return "shadow calls and the canary lose their challenger; answers do not change"
    if target in ("primary", "secondary"):
        other = "secondary" if target == "primary" else "primary"
        if undone:
            return (
                f"the {target}'s breaker half-opens within 2 s, then closes as its trial "
                "calls succeed; decisions return to it"
            )
        if action == "slow":
            return (
                f"the {target} answers late: some decisions go to the {other}, its breaker "
                "may open; the model's share follows what it can still serve"
            )
        return (
            f"decisions come from the {other} when the caller's deadline leaves it time "
            f"after the {target}'s call times out, else from the ladder (the reason names "
            f"the {target}); after 5 failures the {target}'s breaker opens and the {other} "
            "answers at once"
        )
    if undone:
        return "features fresh again within seconds"
    if target == "redis":
        # docs/oncall.md: the audit store holds the control state, Redis only announces it.
        return (
            "features come from each server's mirror until they are 2 s old, then decisions "
            "ABSTAIN (features stale); admin changes still reach every server through the "
            "audit store within a second (decisionctl status shows NOT ANNOUNCED)"
        )
    return (
        "market data stops: past 2 s decisions ABSTAIN (features stale); the consumer "
        "resumes from its committed offsets"
    )


def _watch(action: str, target: str) -> str:
    undo = UNDO.get(action)
    again = f"; undo: decisionctl chaos {undo} {target}" if undo else ""
    watch = WATCH_LOSS if action == RESTART_EMPTY else WATCH_TOP
    return f"{_effect(action, target)}. {watch}{again}"


class ChaosService:
    """Serves chaos requests for ``targets`` (by name) until ``stop``."""

    def __init__(self, run_dir: Path, targets: Mapping[str, ChaosTarget]) -> None:
        self._path = socket_path(run_dir)
        self._targets = dict(targets)
        self._server: asyncio.AbstractServer | None = None
        self._slowing: dict[str, asyncio.Task[None]] = {}
        self._paused: set[str] = set()  # by ``pause``, until resumed, killed or stopped
        self._acting = asyncio.Lock()  # one fault at a time: each waits for the last
        self._closing = False

    async def start(self) -> None:
        self._path.unlink(missing_ok=True)  # left by a stack that was killed
        # Owner-only from the start: the socket is made under a umask that allows no one
        # else (the stack's own process, briefly), not chmod-ed after it exists.
        previous = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self._path), limit=MAX_LINE_BYTES
            )
        finally:
            os.umask(previous)

    async def stop(self) -> None:
        """No new fault once this starts; the one under way (a restart takes up to ~90 s)
        ends first, so that nothing it starts outlives the stack's own stop."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        async with self._acting:
            for name in list(self._slowing):
                await self._end_slowing(name)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            try:
                request = parse_request(line[:MAX_LINE_BYTES])
            except (ValueError, TypeError) as exc:
                answer = ChaosAnswer(False, f"not a chaos request: {exc}")
            else:
                try:
                    answer = await self.handle(request)
                except Exception as exc:  # said to the caller; the stack goes on
                    log.exception("chaos %s %s failed", request.action, request.target)
                    answer = ChaosAnswer(False, f"{request.action} {request.target} failed: {exc}")
            writer.write(answer_line(answer) + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:  # ValueError: too long
            log.info("chaos request dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle(self, request: ChaosRequest) -> ChaosAnswer:
        problem = request.problem()
        target = self._targets.get(request.target)
        if not problem and target is None:
            problem = f"{request.target} is not running in this stack"
        if problem or target is None:
            return ChaosAnswer(False, problem)
        if request.action not in _STARTS and not target.process.running():
            again = "restart" if request.target in REPLICAS else "start"
            return ChaosAnswer(
                False,
                f"{request.target} is not running (killed or stopped): "
                f"decisionctl chaos {again} {request.target}",
            )
        async with self._acting:
            if self._closing:
                return ChaosAnswer(False, "the local stack is stopping")
            if request.action == "resume" and not await self._held(request.target, target.process):
                return ChaosAnswer(
                    False,
                    f"{request.target} ({target.address}, pid {target.process.pid}) is not "
                    "paused: nothing to resume",
                )
            done = await self._act(request, target)
        log.warning("chaos: %s", done)
        return ChaosAnswer(True, done, _watch(request.action, request.target))

    async def _held(self, name: str, proc: ManagedProcess) -> bool:
        """Whether ``name`` is paused or slowed, by this service or by a ``kill -STOP``:
        what ``resume`` undoes."""
        if name in self._paused or name in self._slowing:
            return True
        return await asyncio.to_thread(_group_stopped, proc.pid)  # a pass over /proc

    async def _act(self, request: ChaosRequest, target: ChaosTarget) -> str:
        name, proc = request.target, target.process
        where = f"{name} ({target.address}, pid {proc.pid})"
        action = request.action
        if action != "slow":
            await self._end_slowing(name)
        # Every action but pause leaves the process running (or gone): none paused.
        self._paused.discard(name)
        if action == "pause":
            self._paused.add(name)
            proc.pause()
            return f"paused {where}: SIGSTOP to its process group"
        if action == "resume":
            proc.resume()
            return f"resumed {where}: SIGCONT to its process group"
        if action == "kill":
            await asyncio.to_thread(proc.kill)
            return f"killed {where}: SIGKILL to its process group"
        if action == "stop":
            await asyncio.to_thread(proc.stop)
            return f"stopped {where}: SIGTERM to its process group"
        if action in _STARTS:
            await asyncio.to_thread(proc.stop)
            await asyncio.to_thread(target.restart)
            if action == RESTART_EMPTY:
                return (
                    f"restarted {name} ({target.address}, pid {proc.pid}): serving again, "
                    "empty (it keeps nothing on disk)"
                )
            return f"{action}ed {name} ({target.address}, pid {proc.pid}): serving again"
        await self._end_slowing(name)
        self._slowing[name] = asyncio.create_task(
            _slow(proc, request.stopped_ms, request.running_ms), name=f"slow {name}"
        )
        return (
            f"slowing {where}: off the CPU {request.stopped_ms:.0f} ms of every "
            f"{request.stopped_ms + request.running_ms:.0f} ms until resumed"
        )

    async def _end_slowing(self, name: str) -> None:
        await cancel_and_wait(self._slowing.pop(name, None))


def _group_stopped(pgid: int | None) -> bool:
    """Whether a process of group ``pgid`` is stopped (state T in Linux /proc)."""
    if pgid is None:
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[2] == str(pgid) and fields[0] == "T":
            return True
    return False


async def _slow(proc: ManagedProcess, stopped_ms: float, running_ms: float) -> None:
    """Holds ``proc`` off the CPU ``stopped_ms`` of every cycle: it answers, slowly."""
    try:
        while True:
            proc.pause()
            await asyncio.sleep(stopped_ms / 1000)
            proc.resume()
            await asyncio.sleep(running_ms / 1000)
    finally:
        proc.resume()
