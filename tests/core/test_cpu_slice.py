"""The CPU slice request, on this machine's real kernel, and its refusals with the
kernel's answer replaced (a kernel that ignores the slice, a platform without the call).
Each test asks in a thread of its own: the slice is per thread, and the test process
keeps the kernel's default."""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

from core.cpu_slice import MIN_SLICE_US, SliceResult, current_slice_us, request_cpu_slice

T = TypeVar("T")


def in_new_thread(work: Callable[[], T]) -> T:
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(work()))
    thread.start()
    thread.join()
    return results[0]


def kernel_takes_slices() -> bool:
    """Linux 6.12 and later (EEVDF with sched_attr::sched_runtime as the slice)."""
    if platform.system() != "Linux":
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return (major, minor) >= (6, 12)


@pytest.mark.skipif(not kernel_takes_slices(), reason="the kernel predates custom slices")
def test_a_requested_slice_is_what_the_thread_and_the_threads_it_starts_then_run_with() -> None:
    def ask_then_start_a_thread() -> tuple[SliceResult, int | None]:
        result = request_cpu_slice(300)
        return result, in_new_thread(current_slice_us)

    result, child_slice = in_new_thread(ask_then_start_a_thread)

    assert result == SliceResult(slice_us=300, applied=True)
    assert child_slice == 300


@pytest.mark.skipif(not kernel_takes_slices(), reason="the kernel predates custom slices")
def test_a_slice_under_the_kernels_floor_is_raised_to_it() -> None:
    result = in_new_thread(lambda: request_cpu_slice(10))

    assert result == SliceResult(slice_us=MIN_SLICE_US, applied=True)


@pytest.mark.skipif(not kernel_takes_slices(), reason="the kernel predates custom slices")
def test_asking_leaves_the_other_threads_on_the_default() -> None:
    default = in_new_thread(current_slice_us)
    assert default is not None and default != 250

    in_new_thread(lambda: request_cpu_slice(250))

    assert in_new_thread(current_slice_us) == default


@pytest.mark.skipif(kernel_takes_slices(), reason="this kernel takes custom slices")
def test_an_older_kernel_says_why_the_slice_was_not_taken() -> None:
    result = in_new_thread(lambda: request_cpu_slice(300))

    assert not result.applied
    assert result.why_not


def test_a_kernel_that_accepts_the_call_but_keeps_its_own_slice_is_not_taken_at_its_word(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a kernel before 6.12 does, on any kernel: the thread's slice reads back unchanged.
    monkeypatch.setattr("core.cpu_slice.current_slice_us", lambda: 2800)

    result = in_new_thread(lambda: request_cpu_slice(300))

    assert result == SliceResult(2800, False, f"this kernel ({platform.release()}) keeps its own")


def test_a_platform_without_the_syscalls_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("core.cpu_slice._syscalls", lambda: None)

    result = request_cpu_slice(300)

    assert result.slice_us is None and not result.applied
    assert result.why_not.startswith("not Linux on x86_64/aarch64")
