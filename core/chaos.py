"""The local stack's chaos requests: what ``decisionctl chaos`` sends and the stack answers.

The stack (``make run``) listens on a Unix socket in its run folder, owner-only; a request
is one JSON line, the answer one JSON line. Only the stack that started a process acts
on it, so chaos can never reach anything but the local stack's own processes, all on
loopback, and whatever it pauses or stops, the stack's Ctrl-C still ends.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SOCKET_NAME: Final = "chaos.sock"
REPLICAS: Final = ("primary", "secondary", "challenger")
SERVICES: Final = ("redis", "broker")
# What each kind of target may have done to it.
REPLICA_ACTIONS: Final = ("pause", "resume", "kill", "restart", "slow")
SERVICE_ACTIONS: Final = ("pause", "resume", "stop", "start")
# Redis keeps nothing on disk (localstack/redis_server.py), so stopped and started it comes
# back with no keys: as after a failover to a replica behind, a FLUSHALL or an eviction.
RESTART_EMPTY: Final = "restart-empty"
REDIS_ACTIONS: Final = (*SERVICE_ACTIONS, RESTART_EMPTY)
ACTIONS: Final = tuple(dict.fromkeys((*REPLICA_ACTIONS, *REDIS_ACTIONS)))
MAX_LINE_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class ChaosRequest:
    action: str
    target: str
    # slow: the replica is held off the CPU this long of every stopped_ms + running_ms.
    stopped_ms: float = 20.0
    running_ms: float = 20.0

    def problem(self) -> str:
        """Why the stack would refuse this request ("" when it would not)."""
        allowed = actions_of(self.target)
        if not allowed:
            return f"unknown target {self.target!r}: one of {', '.join(REPLICAS + SERVICES)}"
        if self.action not in allowed:
            return f"{self.target} takes {', '.join(allowed)}, not {self.action}"
        if self.action == "slow" and not (0 < self.stopped_ms <= 1000 and 0 < self.running_ms):
            return "slow needs 0 < stopped_ms <= 1000 and running_ms > 0"
        return ""


def actions_of(target: str) -> tuple[str, ...]:
    """What may be done to ``target`` (nothing to a target the stack does not have)."""
    if target in REPLICAS:
        return REPLICA_ACTIONS
    if target == "redis":
        return REDIS_ACTIONS
    return SERVICE_ACTIONS if target in SERVICES else ()


@dataclass(frozen=True, slots=True)
class ChaosAnswer:
    ok: bool
    message: str  # what was done, or why not
    watch: str = ""  # what to look at now


class NoLocalStack(RuntimeError):
    """No local stack answers in this run folder."""


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


def ask(run_dir: Path, request: ChaosRequest, timeout_s: float) -> ChaosAnswer:
    """Sends ``request`` to the local stack of ``run_dir`` and waits for its answer."""
    path = socket_path(run_dir)
    if not path.exists():
        raise NoLocalStack(
            f"no local stack in {run_dir} (no {SOCKET_NAME}): chaos acts only on the stack "
            "`make run` started, from its checkout"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise NoLocalStack(f"the local stack in {run_dir} does not answer: {exc}") from exc
        sock.sendall(json.dumps(_fields(request)).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < MAX_LINE_BYTES:
            chunk = sock.recv(MAX_LINE_BYTES)
            if not chunk:
                break
            reply += chunk
    try:
        data = json.loads(reply)
        return ChaosAnswer(bool(data["ok"]), str(data["message"]), str(data.get("watch", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise NoLocalStack(f"the local stack in {run_dir} gave no answer ({exc})") from exc


def _fields(request: ChaosRequest) -> dict[str, object]:
    return {name: getattr(request, name) for name in ChaosRequest.__dataclass_fields__}


def parse_request(line: bytes) -> ChaosRequest:
    """A request line as the stack reads it; ValueError when it is not one."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("a request is a JSON object")
    known = {k: v for k, v in data.items() if k in ChaosRequest.__dataclass_fields__}
    return ChaosRequest(**known)


def answer_line(answer: ChaosAnswer) -> bytes:
    return json.dumps({"ok": answer.ok, "message": answer.message, "watch": answer.watch}).encode()
