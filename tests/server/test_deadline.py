"""Budget arithmetic for model calls, and waiting for a call without cancelling it."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable

import pytest
import uvloop

from core import abandon
from core.abandon import settled_within
from core.deadline import Budget, CallPlan, StoreBusy, StoreReads


def test_no_caller_deadline_uses_the_default_budget():
    budget = CallPlan(default_budget_ms=50, response_margin_ms=0).budget(None)
    assert 45 < budget.remaining_ms() <= 50


def test_caller_deadline_is_the_budget():
    assert 9 < CallPlan(response_margin_ms=0).budget(0.010).remaining_ms() <= 10


def test_response_margin_comes_off_the_callers_deadline_only():
    plan = CallPlan(default_budget_ms=50, response_margin_ms=5)
    assert 4 < plan.budget(0.010).remaining_ms() <= 5
    assert 45 < plan.budget(None).remaining_ms() <= 50


async def _answer_lands_during_a_stall() -> bool:
    """A 5 ms wait for an answer that arrives on a socket 1 ms in, while the loop is
    stalled for 30 ms handling another socket's data (as when the machine does not
    schedule the process in the middle of it)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()
    other_in, other_out = socket.socketpair()
    reader, writer = socket.socketpair()
    for sock in (other_in, reader):
        sock.setblocking(False)

    def stall() -> None:
        other_in.recv(16)
        writer.send(b"scores")
        time.sleep(0.030)

    loop.add_reader(other_in, stall)

    def read_answer() -> None:
        if not answer.done():
            answer.set_result(reader.recv(16))

    loop.add_reader(reader, read_answer)
    loop.call_later(0.001, other_out.send, b"work")
    try:
        return await settled_within(answer, 0.005)
    finally:
        for sock in (other_in, reader):
            loop.remove_reader(sock)
        for sock in (other_in, other_out, reader, writer):
            sock.close()


def test_an_answer_that_arrived_while_the_loop_was_stalled_is_not_a_timeout():
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(_answer_lands_during_a_stall())


def test_without_the_grace_uvloop_times_out_an_answer_it_already_has(monkeypatch):
    # Why the grace exists: after a stall uvloop runs its due timers before it reads
    # the sockets, so a plain timed wait reports a timeout for an answer already here.
    # Should a uvloop release change that order, this fails and the grace can go.
    monkeypatch.setattr(abandon, "STALLED_TIMER_S", 3600.0)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert not runner.run(_answer_lands_during_a_stall())


async def test_a_wait_that_ends_on_time_gets_no_grace(monkeypatch):
    # Wide margins, so that a busy machine cannot make this wait look stalled, and a
    # grace given wrongly shows.
    monkeypatch.setattr(abandon, "STALLED_TIMER_S", 0.2)
    monkeypatch.setattr(abandon, "STALL_GRACE_S", 1.0)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = time.perf_counter()
    assert not await settled_within(never, 0.005)
    assert (time.perf_counter() - started) < 0.5


class CallLike:
    """What a grpc.aio call offers ``settled_within``: done() and add_done_callback(),
    callbacks run at once when it ends and never taken back (no remove_done_callback)."""

    def __init__(self) -> None:
        self._done = False
        self.callbacks: list[Callable[[CallLike], None]] = []

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, fn) -> None:
        if self._done:
            fn(self)
        else:
            self.callbacks.append(fn)

    def end(self) -> None:
        self._done = True
        for fn in self.callbacks:
            fn(self)


async def test_a_call_that_ends_in_time_wakes_the_wait_before_its_timeout():
    call = CallLike()
    asyncio.get_running_loop().call_later(0.01, call.end)
    started = time.perf_counter()
    assert await settled_within(call, 5.0)
    assert time.perf_counter() - started < 2.5


async def test_a_call_that_ends_after_the_wait_is_left_running_and_harmless():
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        call = CallLike()
        assert not await settled_within(call, 0.005)
        assert len(call.callbacks) == 1  # the wait's, still on the call
        call.end()  # it must do nothing now: no error here, nor later on the loop
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_a_call_already_done_is_settled_without_a_callback():
    call = CallLike()
    call.end()
    assert await settled_within(call, 0.0)
    assert call.callbacks == []


@pytest.mark.parametrize(
    ("remaining", "cap", "expected"),
    [(50.0, 20.0, 20.0), (10.0, 20.0, 7.0), (2.0, 20.0, -1.0)],
)
def test_call_timeout_is_budget_less_reserve_capped(remaining, cap, expected):
    plan = CallPlan(model_call_ms=cap, fallback_reserve_ms=3.0, jitter=0.0)
    got = plan.model_call_timeout_ms(Budget(remaining, started=time.monotonic()), random.Random(1))
    assert got == pytest.approx(expected, abs=0.5)


def test_jitter_only_lowers_the_cap_by_at_most_its_share():
    rng = random.Random(3)
    plan = CallPlan(model_call_ms=20, fallback_reserve_ms=3, jitter=0.1)
    values = [plan.model_call_timeout_ms(Budget(1000), rng) for _ in range(1000)]
    assert min(values) >= 18.0
    assert max(values) <= 20.0
    assert len(set(values)) > 900


async def test_a_read_returns_at_its_timeout_however_slow_the_call_is_to_clean_up():
    """A client whose clean-up on cancellation blocks (redis-py closing its connection to
    a paused server) must not hold the caller past its timeout."""
    cleaned = asyncio.Event()

    async def slow_call() -> str:
        try:
            await asyncio.sleep(0.5)
            return "late"
        finally:
            await asyncio.sleep(0.2)  # a clean-up that takes its time
            cleaned.set()

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await StoreReads(cap_ms=10, max_abandoned=4).run(slow_call(), 20.0)
    assert time.monotonic() - started < 0.15
    assert not cleaned.is_set()  # left running, not cancelled
    await asyncio.wait_for(cleaned.wait(), 2)


async def test_a_read_gives_the_answer_of_a_call_that_ends_in_time():
    async def quick() -> int:
        return 7

    assert await StoreReads(cap_ms=10, max_abandoned=4).run(quick(), 1000.0) == 7


async def test_no_read_starts_while_max_abandoned_reads_still_run():
    """A hung store: reads pile up no further than the bound, and the next read starts
    again once the abandoned ones end."""
    store_wakes = asyncio.Event()
    started = 0

    async def hung_read() -> str:
        nonlocal started
        started += 1
        await store_wakes.wait()
        return "late"

    reads = StoreReads(cap_ms=10, max_abandoned=3)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await reads.run(hung_read(), 5.0)
    with pytest.raises(StoreBusy, match="3 abandoned reads"):
        await reads.run(hung_read(), 5.0)
    assert started == 3
    assert reads.abandoned == 3

    store_wakes.set()
    for _ in range(10):  # a few loop turns: the abandoned reads end
        await asyncio.sleep(0)
    assert reads.abandoned == 0
    assert await reads.run(hung_read(), 5.0) == "late"
    assert started == 4


def test_a_read_may_spend_the_budget_left_up_to_the_cap():
    reads = StoreReads(cap_ms=10, max_abandoned=3)
    assert reads.timeout_ms(Budget(50)) == 10
    assert 0 < reads.timeout_ms(Budget(4)) <= 4
