"""Waiting for work without cancelling it, and the bounded pool of abandoned work."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
import uvloop

from core import abandon, deadline
from core.abandon import AbandonPool, settled_within

pytestmark = pytest.mark.timed  # 5 ms waits, and the wall time they take


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
    monkeypatch.setattr(abandon, "stall_grace_s", lambda late_by_s: 0.0)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert not runner.run(_answer_lands_during_a_stall())


async def test_a_wait_that_ends_on_time_gets_no_grace(monkeypatch):
    # Wide margins, so that a busy machine cannot make this wait look stalled, and a
    # grace given wrongly shows.
    monkeypatch.setattr(deadline, "STALLED_TIMER_S", 0.2)
    monkeypatch.setattr(deadline, "STALL_GRACE_S", 1.0)
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


async def test_work_that_ends_in_time_is_not_abandoned() -> None:
    pool = AbandonPool(2)
    work = asyncio.ensure_future(asyncio.sleep(0.001, result="answer"))
    assert await pool.wait(work, 1.0)
    assert work.result() == "answer"
    assert (pool.outstanding, pool.total) == (0, 0)


async def test_work_past_its_wait_runs_on_uncancelled_and_is_counted_until_it_ends() -> None:
    ended: list[object] = []
    pool = AbandonPool(2, on_end=lambda future: ended.append(future.result()))
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "late"

    work = asyncio.ensure_future(slow())
    assert not await pool.wait(work, 0.005)
    assert not work.cancelled()
    assert (pool.outstanding, pool.total) == (1, 1)
    release.set()
    await asyncio.sleep(0.01)
    assert (pool.outstanding, pool.total) == (0, 1)
    assert ended == ["late"]


async def test_a_cancelled_waiter_abandons_its_work_rather_than_cancelling_it() -> None:
    pool = AbandonPool(2)
    release = asyncio.Event()
    work = asyncio.ensure_future(release.wait())
    waiter = asyncio.ensure_future(pool.wait(work, 10.0))
    await asyncio.sleep(0.005)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert not work.done()
    assert pool.outstanding == 1
    release.set()
    await asyncio.sleep(0.01)
    assert pool.outstanding == 0


async def test_past_the_bound_no_work_is_admitted_until_some_ends() -> None:
    pool = AbandonPool(2)
    release = asyncio.Event()
    for _ in range(2):
        assert pool.admits()
        assert not await pool.wait(asyncio.ensure_future(release.wait()), 0.001)
    assert not pool.admits()
    assert not pool.admits()
    assert pool.refused == 2
    assert pool.oldest_at <= time.monotonic()
    release.set()
    await pool.drain(1.0)
    assert pool.admits()
    assert pool.oldest_at == float("inf")


async def test_abandoned_work_that_fails_is_not_an_error_of_the_loop() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        pool = AbandonPool(1)

        async def fails() -> None:
            await asyncio.sleep(0.01)
            raise ConnectionResetError

        assert not await pool.wait(asyncio.ensure_future(fails()), 0.001)
        await pool.drain(1.0)
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert errors == []
