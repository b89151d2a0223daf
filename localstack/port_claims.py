"""``PortClaims``: a local stack's ports claimed before it binds them, so that two stacks
started at the same moment never share one.

A stack binds its ports one process at a time over a minute of starting (TorchServe's
last), so a second stack that checks for ports in use meanwhile finds them free, starts
on them too, and one of the two fails half-way. A claim is an exclusive ``flock`` on one
file per port in a folder that every stack of this machine shares. The kernel drops it
when the claiming process exits however it exits, so a crashed stack leaves no stale
claim behind. Each file holds the claimer's pid, for the message of the stack refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

CLAIMS_DIR = Path(tempfile.gettempdir()) / "decision-stack-ports"


class PortClaims:
    """The claims of one stack; ``release`` (or the process's exit) gives them up."""

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = folder or CLAIMS_DIR
        self._held: dict[int, int] = {}  # port -> the locked file's descriptor

    @property
    def held(self) -> list[int]:
        return sorted(self._held)

    def claim(self, ports: Iterable[int]) -> dict[int, str]:
        """Claims every one of ``ports`` and returns ``{}``, or claims none of them and
        returns, for each port another process claims, who (``pid N``)."""
        wanted = sorted(set(ports) - set(self._held))
        taken: dict[int, str] = {}
        locked: dict[int, int] = {}
        for port in wanted:
            fd = self._open(port)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                taken[port] = self._holder(fd)
                os.close(fd)
                continue
            locked[port] = fd
        if taken:
            for fd in locked.values():
                os.close(fd)  # closing the only descriptor drops its lock
            return taken
        for port, fd in locked.items():
            with contextlib.suppress(OSError):  # opened read-only: the claim holds all the same
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held[port] = fd
        return {}

    def claimed_elsewhere(self, ports: Iterable[int]) -> list[int]:
        """Which of ``ports`` another claim holds now (this object's own excepted)."""
        claimed = []
        for port in sorted(set(ports) - set(self._held)):
            fd = self._open(port)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                claimed.append(port)
            finally:
                os.close(fd)
        return claimed

    def release(self) -> None:
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)

    def _open(self, port: int) -> int:
        # Shared by every user's stacks: a folder anyone may add files to, as /tmp is.
        if not self._folder.is_dir():
            self._folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(PermissionError):  # another user made it first
                self._folder.chmod(0o1777)
        path = self._folder / f"{port}.lock"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's file: a lock needs no write access
            return os.open(path, os.O_RDONLY)

    @staticmethod
    def _holder(fd: int) -> str:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return f"pid {pid}" if pid.isdigit() else "another stack"
