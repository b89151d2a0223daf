"""``request_cpu_slice``: ask Linux's scheduler to run this process soon after it wakes.

Linux's fair scheduler (EEVDF, 6.6 and later) picks the runnable task with the earliest
virtual deadline, and a task's deadline is its place in the queue plus its *slice*:
how long it means to run once picked (about 0.7 ms times 1 + log2(cores) by default).
Since 6.12 a process may ask for a shorter slice (``sched_setattr``'s ``sched_runtime``,
0.1-100 ms, no privilege needed): its deadlines come earlier, so when it wakes it
preempts a task with a longer slice at once instead of waiting for that slice to end.
It gets no more CPU than before (that is the weight, ``nice``), only sooner.

That is the decision server's need on shared cores: it uses a fraction of one core, in
bursts of well under a millisecond per request, and every millisecond a request or a
timer waits for a CPU while a TorchServe JVM finishes its slice comes out of the
caller's deadline. The slice is set on the calling thread before any other thread or
worker exists: threads and forked children inherit it.

On another OS, or a kernel that ignores the request (before 6.12), nothing changes and
the caller is told so.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

# The kernel clamps a requested slice to this range (include/linux/sched.h).
MIN_SLICE_US = 100
MAX_SLICE_US = 100_000

# x86_64 and aarch64 (asm-generic) numbers of sched_setattr / sched_getattr.
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
_SCHED_OTHER = 0


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` as of Linux 4.13 (SCHED_ATTR_SIZE_VER1)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),  # SCHED_OTHER: the requested slice (ns)
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class SliceResult:
    """What the kernel now runs the calling thread with: ``slice_us`` as it reports it
    (None where it cannot say), and ``applied``: whether that is the slice asked for."""

    slice_us: int | None
    applied: bool
    why_not: str = ""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscalls() -> tuple[int, int] | None:
    if platform.system() != "Linux":
        return None
    return _SYSCALLS.get(platform.machine())


def current_slice_us() -> int | None:
    """The calling thread's slice as the kernel reports it (µs); None where it cannot."""
    numbers = _syscalls()
    if numbers is None:
        return None
    attr = _SchedAttr()
    if _libc().syscall(numbers[1], 0, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return int(attr.sched_runtime) // 1000 if attr.sched_runtime else None


def request_cpu_slice(slice_us: int) -> SliceResult:
    """Ask for a ``slice_us`` slice (clamped to the kernel's range) for the calling
    thread, keeping its policy (SCHED_OTHER) and nice value. Never raises: a refusal
    comes back as ``applied=False`` with the reason."""
    numbers = _syscalls()
    if numbers is None:
        return SliceResult(None, False, f"not Linux on x86_64/aarch64 ({platform.platform()})")
    wanted = min(max(slice_us, MIN_SLICE_US), MAX_SLICE_US)
    attr = _SchedAttr(
        size=ctypes.sizeof(_SchedAttr),
        sched_policy=_SCHED_OTHER,
        sched_nice=os.getpriority(os.PRIO_PROCESS, 0),
        sched_runtime=wanted * 1000,
    )
    if _libc().syscall(numbers[0], 0, ctypes.byref(attr), 0) != 0:
        errno = ctypes.get_errno()
        return SliceResult(current_slice_us(), False, f"sched_setattr: {os.strerror(errno)}")
    now = current_slice_us()
    if now != wanted:  # a kernel before 6.12 accepts the call and ignores the runtime
        return SliceResult(now, False, f"this kernel ({platform.release()}) keeps its own")
    return SliceResult(now, True)
