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
import time
from collections.abc import Iterable
from pathlib import Path

CLAIMS_DIR = Path(tempfile.gettempdir()) / "decision-stack-ports"
# Another process's look at a port (``claimed_elsewhere``) locks its file for a moment:
# a claim retries that long before it calls the port taken.
PROBE_GRACE_S = 0.2


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
        returns the first port another process claims, with who (``pid N``)."""
        locked: dict[int, int] = {}
        try:
            for port in sorted(set(ports) - set(self._held)):
                fd = self._open(port, create=True)
                if fd is None:  # a folder this user cannot write: no claim, no refusal
                    continue
                if not _lock(fd, grace_s=PROBE_GRACE_S):
                    holder = _holder(fd)
                    os.close(fd)
                    return {port: holder}
                locked[port] = fd
            for fd in locked.values():
                with contextlib.suppress(OSError):  # opened read-only: the claim holds still
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held.update(locked)
            locked = {}
            return {}
        finally:
            for fd in locked.values():  # refused, or failed part-way: keep nothing
                os.close(fd)  # closing the only descriptor drops its lock

    def claimed_elsewhere(self, ports: Iterable[int]) -> list[int]:
        """Which of ``ports`` another claim holds now (this object's own excepted)."""
        claimed = []
        for port in sorted(set(ports) - set(self._held)):
            fd = self._open(port, create=False)
            if fd is None:  # never claimed on this machine
                continue
            try:
                if not _lock(fd, grace_s=0.0):
                    claimed.append(port)
            finally:
                os.close(fd)
        return claimed

    def release(self) -> None:
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)

    def _open(self, port: int, *, create: bool) -> int | None:
        """The port's file, or None where it is missing (``create`` False) or this user
        may neither create nor read it."""
        path = self._folder / f"{port}.lock"
        if create and not self._folder.is_dir():
            self._folder.mkdir(parents=True, exist_ok=True)
            # Shared by every user's stacks: a folder anyone may add files to, as /tmp is.
            with contextlib.suppress(PermissionError):  # another user made it first
                self._folder.chmod(0o1777)
        flags = os.O_RDWR | os.O_CREAT if create else os.O_RDWR
        try:
            return os.open(path, flags, 0o666)
        except FileNotFoundError:
            return None
        except PermissionError:  # another user's file: a lock needs no write access
            try:
                return os.open(path, os.O_RDONLY)
            except OSError:
                return None


def _lock(fd: int, *, grace_s: float) -> bool:
    """An exclusive lock on ``fd``, retried for ``grace_s``; False when another holds it."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _holder(fd: int) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {pid}" if pid.isdigit() else "another stack"
