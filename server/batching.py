"""``BatchingClient``: concurrent calls to one replica coalesced into one model call.

A ``ModelClient`` in front of another. A model call takes the queued rows (up to
``max_batch_rows``) whenever fewer than ``max_concurrent_calls`` calls are out, so the
batch grows with the load and no timer delays a request. A request never waits past the
point where a call would no longer fit before its deadline: it leaves the queue unsent
(``ModelNoTime``, not the replica's fault). Each request keeps its own deadline inside a
shared call, and a bad row fails only its own request. Why no call past the cap:
docs/architecture.md#deadlines-and-load-on-the-decide-path.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.deadline import ExpectedCallTime, shared_call_wait_s
from server.model_client import ModelClient, ModelScores, timeout_error
from server.model_errors import (
    ModelBusy,
    ModelCallError,
    ModelFailure,
    ModelInputError,
    ModelNoTime,
    ModelTimeout,
    ModelUnavailable,
)

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Queued:
    rows: Sequence[Sequence[float]]
    deadline: float  # loop time
    enqueued: float  # perf_counter
    future: asyncio.Future[ModelScores]
    timer: asyncio.TimerHandle | None = field(default=None)
    call: asyncio.Task[None] | None = field(default=None)  # the model call it is in
    batch: list[_Queued] = field(default_factory=list)  # everyone in that call
    # The caller's context (its span, its decision ids), for the call that carries it.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


@dataclass(frozen=True, slots=True)
class BatchingStats:
    calls: int  # model calls made
    rows: int  # rows they carried
    requests: int  # predict calls answered through the queue
    out_of_time: int  # requests that left the queue unsent: the replica stayed busy


def _clone(exc: ModelFailure, *, given_ms: float) -> Exception:
    """One exception per waiter (raising one instance in many tasks mixes their
    tracebacks); a timeout carries the time the replica had for this waiter's rows."""
    if isinstance(exc, ModelTimeout):
        return ModelTimeout(str(exc), given_ms=min(exc.given_ms, given_ms))
    if isinstance(exc, ModelBusy):  # whether the replica is silent decides whose fault
        return ModelBusy(str(exc), silent_ms=exc.silent_ms)
    return type(exc)(str(exc))


# Rows in one model call at most: a replica scores 64 rows about as fast as one
# (docs/benchmarks.md), and larger calls only lengthen the wait of the first row.
MAX_BATCH_ROWS = 64


class BatchingClient:
    def __init__(
        self,
        inner: ModelClient,
        *,
        max_batch_rows: int = MAX_BATCH_ROWS,
        max_concurrent_calls: int,
    ) -> None:
        """A request that times out says how long the replica had for it: from when its
        call went out to its deadline (its wait in the queue is not the replica's)."""
        self.name = inner.name
        self.model_name = inner.model_name
        self._inner = inner
        self._max_rows = max_batch_rows
        self._max_calls = max_concurrent_calls
        self._queue: deque[_Queued] = deque()
        self._calls_out = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._expected = ExpectedCallTime()
        self._calls = self._rows = self._requests = self._out_of_time = 0

    @property
    def inner(self) -> ModelClient:
        return self._inner

    @property
    def max_concurrent_calls(self) -> int:
        return self._max_calls

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        queued, self._queue = list(self._queue), deque()
        for waiter in queued:
            self._settle(waiter, ModelUnavailable(f"{self.name} client stopped"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._inner.stop()

    async def connect(self, timeout_s: float) -> bool:
        return await self._inner.connect(timeout_s)

    def stats(self) -> BatchingStats:
        return BatchingStats(self._calls, self._rows, self._requests, self._out_of_time)

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        if len(rows) >= self._max_rows:  # a full call already
            return await self._inner.predict(rows, timeout_s)
        loop = asyncio.get_running_loop()
        queued = _Queued(
            rows,
            loop.time() + timeout_s,
            time.perf_counter(),
            loop.create_future(),
        )
        self._queue.append(queued)
        # Queued while the replica is busy, but only while a call still fits in time.
        queued.timer = loop.call_at(
            self._expected.leaves_queue_at(queued.deadline), self._out_of_queue_time, queued
        )
        if self._calls_out < self._max_calls:
            self._schedule_flush(loop)
        try:
            return await queued.future
        except asyncio.CancelledError:
            # The caller went away: a call nobody waits for any more
            # gives its slot back (its RPC is abandoned to finish on the wire, never
            # cancelled: see server.model_client).
            if queued.call is not None and all(q.future.done() for q in queued.batch):
                queued.call.cancel()
            raise
        finally:
            if queued.timer is not None:
                queued.timer.cancel()

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        # At the end of this loop turn: requests that arrived in it share the call.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # In no request's context: the flush (and what it starts) would otherwise
            # inherit the scheduler's, and every later call that of one old request.
            loop.call_soon(self._flush, context=contextvars.Context())

    def _out_of_queue_time(self, queued: _Queued) -> None:
        """A queued request has only the time of a call left: it goes now if a call may
        go, else it leaves the queue unsent."""
        # Never sent past the cap: a replica works one call a worker at a time, so the
        # extra call would only wait in the replica's own queue, and a slow replica sent
        # one call per waiting request falls behind until every call times out. Unsent, the
        # router tries the next replica or the ladder answers, in the time kept back for it.
        try:
            self._queue.remove(queued)
        except ValueError:  # already in a call, or its caller was cancelled
            return
        if self._calls_out < self._max_calls:  # a call ended this loop turn: the queue goes
            self._queue.appendleft(queued)  # and this request in its first call
            self._flush()
            return
        self._out_of_time += 1
        waited_ms = (time.perf_counter() - queued.enqueued) * 1000.0
        self._settle(
            queued,
            ModelNoTime(
                f"{self.name} busy: {self._calls_out} call(s) out all the {waited_ms:.1f} ms"
                " it could wait"
            ),
        )

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._calls_out < self._max_calls:
            batch: list[_Queued] = []
            rows = 0
            while self._queue and (not batch or rows + len(self._queue[0].rows) <= self._max_rows):
                queued = self._queue.popleft()
                if queued.future.done():  # its caller was cancelled
                    continue
                batch.append(queued)
                rows += len(queued.rows)
            if not batch:
                break
            self._start_call(batch)

    def _start_call(self, batch: list[_Queued]) -> None:
        self._calls_out += 1
        # The call runs in its first request's context (a copy): its RPC's span is a
        # child of that request's attempt, and nothing carries over to later calls.
        task = asyncio.create_task(self._score(batch), context=batch[0].context.copy())
        for queued in batch:
            queued.call, queued.batch = task, batch
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._call_done(done, batch))

    def _call_done(self, task: asyncio.Task[None], batch: list[_Queued]) -> None:
        """However the call ended (cancelled before it even ran, too), nobody in it is
        left waiting, its slot is free and the queue moves on."""
        self._tasks.discard(task)
        # Also a call abandoned at its timeout: its RPC may still be out, and the client
        # below bounds those.
        self._calls_out -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: batched call failed unexpectedly", self.name, exc_info=task.exception())
        for queued in batch:
            self._settle(queued, ModelUnavailable(f"{self.name} call ended without an answer"))
        if self._queue:
            self._schedule_flush(asyncio.get_running_loop())

    async def _score(self, batch: list[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        batch = [queued for queued in batch if not queued.future.done()]
        if not batch:
            return
        sent_at = loop.time()
        rows = [row for queued in batch for row in queued.rows]
        timeout_s = shared_call_wait_s((queued.deadline for queued in batch), sent_at)
        for queued in batch:
            if queued.timer is not None:
                queued.timer.cancel()
            if queued.deadline < sent_at + timeout_s:  # fails alone at its deadline
                queued.timer = loop.call_at(queued.deadline, self._late, queued, sent_at)
        try:
            scores = await self._inner.predict(rows, timeout_s)
        except ModelInputError as exc:
            if len(batch) == 1:
                self._settle(batch[0], exc, sent_at)
            else:  # whose rows? each alone finds out, without failing the others
                await asyncio.gather(*(self._score([queued]) for queued in batch))
            return
        except ModelCallError as exc:
            for queued in batch:
                self._settle(queued, exc, sent_at)
            return
        self._calls += 1
        self._rows += len(rows)
        self._requests += len(batch)
        self._expected.answered(scores.elapsed_ms)
        answered = time.perf_counter()
        start = 0
        for queued in batch:
            end = start + len(queued.rows)
            if not queued.future.done():
                queued.future.set_result(
                    ModelScores(
                        scores.model_name,
                        scores.model_version,
                        scores.scores[start:end],
                        (answered - queued.enqueued) * 1000.0,
                    )
                )
            start = end

    def _late(self, queued: _Queued, sent_at: float) -> None:
        elapsed_ms = (time.perf_counter() - queued.enqueued) * 1000
        wait_ms = (queued.deadline - sent_at) * 1000.0
        timeout = timeout_error(self.name, elapsed_ms, wait_ms)
        self._settle(queued, timeout, sent_at)

    def _settle(
        self,
        queued: _Queued,
        exc: ModelFailure,
        sent_at: float | None = None,
    ) -> None:
        """Fails one waiter, unless answered already; ``sent_at``: when its call went out
        (None: it never did), so that a timeout carries the time the replica really had."""
        if queued.future.done():
            return
        given_ms = 0.0 if sent_at is None else max(queued.deadline - sent_at, 0.0) * 1000.0
        queued.future.set_exception(_clone(exc, given_ms=given_ms))
