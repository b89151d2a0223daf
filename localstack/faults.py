"""Faults on a running local stack by schedule: what ``make soak`` injects (``--fault``,
``--chaos``). A pause is SIGSTOP from this process; a kill, a slow-down or a stop goes
through the stack's chaos service (``localstack.chaos``), as ``decisionctl chaos`` does,
and is undone after the fault's duration. docs/local-stack.md#faults-in-the-soak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from core.chaos import REPLICAS, RESTART_EMPTY, ChaosRequest, NoLocalStack, ask
from localstack.chaos import UNDO
from localstack.stack import LocalStack

# Paused together by a ``pause`` of the target's name (SIGSTOP, on this process's side).
FAULT_GROUPS = {
    "primary": ("torchserve-primary",),
    "replicas": ("torchserve-primary", "torchserve-secondary"),
    "redis": ("redis-server",),
    "broker": ("kafka-broker",),
}
# Each action's targets, and what its fault is called. ``redis-empty`` and ``kill-worker``
# take no duration: Redis restarted with no keys; one decision worker killed with
# SIGKILL, which the server's supervisor starts again.
TARGETS_OF = {
    "pause": tuple(FAULT_GROUPS),
    "kill": REPLICAS,
    "slow": REPLICAS,
    "stop": ("broker",),
    "redis-empty": ("redis",),
    "kill-worker": ("decision",),
}
LABELS = {
    "pause": "{} paused",
    "kill": "{} killed",
    "slow": "{} slowed",
    "stop": "{} stopped",
    "redis-empty": "redis restarted empty",
    "kill-worker": "a decision worker killed",
}
INSTANT = ("redis-empty", "kill-worker")
# A slowed replica is held off the CPU this long, then let run as long, over and over:
# about half its calls overrun a 20 ms slow-call mark (issue 55's sick replica).
SLOW_STOPPED_MS = SLOW_RUNNING_MS = 60.0
# Chaos: each action's drawn duration in seconds (a kill's: how long the part stays down).
CHAOS_DURATIONS_S = {"pause": (5, 30), "kill": (5, 20), "slow": (20, 60), "stop": (5, 20)}
CHAOS_FIRST_S = 60.0  # steady windows before the first fault
CHAOS_GAP_S = (120.0, 240.0)  # from one fault's end to the next one's start


@dataclass(frozen=True, slots=True)
class Fault:
    target: str
    at_s: float
    duration_s: float
    action: str = "pause"

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``[ACTION:]TARGET@START+DURATION``, seconds since the measured load started;
        ACTION pause (the default), kill, slow or stop; ``redis-empty@START`` and
        ``kill-worker@START`` have no duration."""
        action, colon, rest = text.rpartition(":")
        try:
            target, when = rest.split("@")
            start, plus, duration = when.partition("+")
            at_s, duration_s = float(start), float(duration) if plus else 0.0
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not [ACTION:]TARGET@START+DURATION: {text!r}"
            ) from None
        if target in INSTANT and not colon:
            action, target = target, TARGETS_OF[target][0]
        elif not colon:
            action = "pause"
        if target not in TARGETS_OF.get(action, ()):
            kinds = "; ".join(f"{a}: {', '.join(t)}" for a, t in TARGETS_OF.items())
            raise argparse.ArgumentTypeError(f"{text!r}: a fault is one of ({kinds})")
        if action in INSTANT:
            well_formed = not plus and not colon
        else:
            well_formed = math.isfinite(duration_s) and duration_s > 0
        if not (well_formed and math.isfinite(at_s) and at_s >= 0):
            form = f"{action}@START" if action in INSTANT else "TARGET@START+DURATION, DURATION > 0"
            raise argparse.ArgumentTypeError(f"{text!r}: {action} takes {form}, START >= 0")
        return cls(target, at_s, duration_s, action)

    def label(self) -> str:
        return LABELS[self.action].format(self.target)

    def spec(self) -> str:
        """The text ``parse`` reads back: a drawn plan, repeatable by hand."""
        if self.action in INSTANT:
            return f"{self.action}@{self.at_s:g}"
        action = "" if self.action == "pause" else f"{self.action}:"
        return f"{action}{self.target}@{self.at_s:g}+{self.duration_s:g}"


def chaos_plan(seed: int, duration_s: float, *, spare_s: float, workers: int = 1) -> list[Fault]:
    """Faults drawn with ``seed`` from every kind (a worker killed only with workers, so a
    seed repeats a run with the same ``workers``): one at a time, the next 2-4 minutes
    after the last ended, the last ending ``spare_s`` before ``duration_s``."""
    rng = random.Random(seed)  # noqa: S311 -- a plan that repeats from its seed, no secret
    kinds = [
        (action, target)
        for action, targets in TARGETS_OF.items()
        for target in targets
        if action != "kill-worker" or workers > 1
    ]
    faults: list[Fault] = []
    at_s = CHAOS_FIRST_S
    while True:
        action, target = rng.choice(kinds)
        duration = round(rng.uniform(*CHAOS_DURATIONS_S.get(action, (0, 0))))
        fault = Fault(target, round(at_s), duration, action)
        if fault.at_s + fault.duration_s + spare_s > duration_s:
            return faults
        faults.append(fault)
        at_s = fault.at_s + fault.duration_s + rng.uniform(*CHAOS_GAP_S)


async def inject(stack: LocalStack, fault: Fault, started_at: float) -> str:
    """Injects ``fault`` on schedule; why it could not be, in words ("" when it was)."""
    await asyncio.sleep(max(0.0, started_at + fault.at_s - time.monotonic()))
    if fault.action == "redis-empty":
        return await chaos(stack, ChaosRequest(RESTART_EMPTY, "redis"))
    if fault.action == "kill-worker":
        return kill_worker(stack)
    if fault.action == "pause":
        groups = [stack.processes[name] for name in FAULT_GROUPS[fault.target]]
        names = ", ".join(p.name for p in groups)
        print(f"--- fault: SIGSTOP {names} for {fault.duration_s:.0f} s")
        for proc in groups:
            proc.pause()
        try:
            await asyncio.sleep(fault.duration_s)
        finally:
            for proc in groups:
                proc.resume()
            print(f"--- fault over: SIGCONT {names}")
        return ""
    request = ChaosRequest(fault.action, fault.target, SLOW_STOPPED_MS, SLOW_RUNNING_MS)
    problem = await chaos(stack, request)
    if problem:
        return problem
    try:
        await asyncio.sleep(fault.duration_s)
    finally:
        problem = await chaos(stack, ChaosRequest(UNDO[fault.action], fault.target))
    return problem


async def chaos(stack: LocalStack, request: ChaosRequest) -> str:
    """Does ``request`` through the stack's own chaos service (the stack's Ctrl-C still
    ends what it starts, and it logs what it did); why it was not done, in words."""
    print(f"--- fault: decisionctl chaos {request.action} {request.target}")
    try:
        # A restart takes seconds (a JVM's boot); the timeout only bounds a hang.
        answer = await asyncio.to_thread(ask, stack.run_dir, request, 120.0)
    except (NoLocalStack, OSError) as exc:
        return f"chaos {request.action} {request.target} not done: {exc}"
    return "" if answer.ok else f"chaos {request.action} {request.target} refused: {answer.message}"


def kill_worker(stack: LocalStack) -> str:
    """SIGKILL to one decision worker (a child of the server's supervisor forked from it,
    so with its command line): one that holds a caller's connection, where there is one."""
    supervisor = stack.processes["decision-server"].pid
    if supervisor is None or stack.workers < 2:
        return "kill-worker: no decision workers (the stack runs with --workers 2 or more)"
    try:
        own = Path(f"/proc/{supervisor}/cmdline").read_bytes()
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        workers = [p for p in map(int, children) if Path(f"/proc/{p}/cmdline").read_bytes() == own]
        connected = connection_inodes(stack.decision_port)
        workers.sort(key=lambda pid: not connected & socket_inodes(pid))
    except OSError as exc:
        return f"kill-worker: the decision server's workers not found: {exc}"
    if not workers:
        return "kill-worker: the decision server has no worker running"
    print(f"--- fault: SIGKILL decision worker {workers[0]}")
    os.kill(workers[0], signal.SIGKILL)
    return ""


def connection_inodes(port: int) -> set[str]:
    """The socket inodes of established TCP connections to ``port`` on this machine."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    """The socket inodes among ``pid``'s open files (one closed meanwhile is skipped)."""
    inodes = set()
    for fd in list(Path(f"/proc/{pid}/fd").iterdir()):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    return inodes
