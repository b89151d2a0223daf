"""``BatchingClient``: concurrent calls to one replica coalesced into one model call.

A ``ModelClient`` in front of another. Each ``predict`` joins a queue; a model call takes
the queued rows (up to ``max_batch_rows``) whenever fewer than ``max_concurrent_calls``
calls are out to the replica. So the window adapts to load by itself: an idle replica
gets a request at once (the flush runs in the same event-loop turn, so calls that arrive
together still share it), a busy one gets whatever gathered while it worked, and no
timer ever delays a request.

Deadline-aware: a request never waits in the queue past the point where a call would
no longer fit before its deadline (``deadline - 2 x expected call time``): then it goes
alone, whatever the cap. Each request keeps its own deadline inside a shared call, which
runs until the latest one. The shared call costs a request no time of its own because a
replica scores 64 rows about as fast as one (measured: 1.86 / 2.05 / 1.99 ms p50 for
1 / 8 / 64 rows); so a request meets every deadline it would have met alone.

A call the replica rejects (``ModelInputError``: a bad row) is retried row set by row
set, so one caller's bad row never fails the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.model_client import (
    ModelCallError,
    ModelClient,
    ModelInputError,
    ModelScores,
    ModelTimeout,
    ModelUnavailable,
)

log = logging.getLogger(__name__)

# The expected call time: until the first answer this, then an EWMA of the answers.
INITIAL_EXPECTED_MS = 2.0
EXPECTED_WEIGHT = 0.1


@dataclass(slots=True, eq=False)
class _Queued:
    rows: Sequence[Sequence[float]]
    deadline: float  # loop time
    budget_limited: bool
    enqueued: float  # perf_counter
    future: asyncio.Future[ModelScores]
    timer: asyncio.TimerHandle | None = field(default=None)


@dataclass(frozen=True, slots=True)
class BatchingStats:
    calls: int  # model calls made
    rows: int  # rows they carried
    requests: int  # predict calls answered through the queue
    sent_alone: int  # requests whose deadline came near while the replica was busy


def _clone(exc: ModelCallError | ModelInputError) -> Exception:
    """One exception per waiter: raising one instance in many tasks mixes their tracebacks."""
    if isinstance(exc, ModelTimeout):
        return ModelTimeout(str(exc), budget_limited=exc.budget_limited)
    return type(exc)(str(exc))


class BatchingClient:
    def __init__(
        self, inner: ModelClient, *, max_batch_rows: int, max_concurrent_calls: int
    ) -> None:
        self.name = inner.name
        self.model_name = inner.model_name
        self._inner = inner
        self._max_rows = max_batch_rows
        self._max_calls = max_concurrent_calls
        self._queue: deque[_Queued] = deque()
        self._calls_out = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._expected_ms = INITIAL_EXPECTED_MS
        self._answered = False
        self._calls = self._rows = self._requests = self._sent_alone = 0

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        queued, self._queue = list(self._queue), deque()
        self._fail(queued, ModelUnavailable(f"{self.name} client stopped"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._inner.stop()

    async def connect(self, timeout_s: float) -> bool:
        return await self._inner.connect(timeout_s)

    def stats(self) -> BatchingStats:
        return BatchingStats(self._calls, self._rows, self._requests, self._sent_alone)

    async def predict(
        self, rows: Sequence[Sequence[float]], timeout_s: float, *, budget_limited: bool = False
    ) -> ModelScores:
        if len(rows) >= self._max_rows:  # a full call already
            return await self._inner.predict(rows, timeout_s, budget_limited=budget_limited)
        loop = asyncio.get_running_loop()
        queued = _Queued(
            rows,
            loop.time() + timeout_s,
            budget_limited,
            time.perf_counter(),
            loop.create_future(),
        )
        self._queue.append(queued)
        # Queued while the replica is busy, but only while a call still fits in time.
        queued.timer = loop.call_at(
            queued.deadline - 2 * self._expected_ms / 1000.0, self._send_alone, queued
        )
        if self._calls_out < self._max_calls:
            self._schedule_flush(loop)
        try:
            return await queued.future
        finally:
            if queued.timer is not None:
                queued.timer.cancel()

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        # At the end of this loop turn: requests that arrived in it share the call.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _send_alone(self, queued: _Queued) -> None:
        try:
            self._queue.remove(queued)
        except ValueError:  # already in a call, or its caller was cancelled
            return
        self._sent_alone += 1
        self._start_call([queued])

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
        task = asyncio.create_task(self._call(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[_Queued]) -> None:
        try:
            await self._score(batch)
        finally:
            self._calls_out -= 1
            if self._queue:
                self._schedule_flush(asyncio.get_running_loop())

    async def _score(self, batch: list[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        rows = [row for queued in batch for row in queued.rows]
        timeout_s = max(queued.deadline for queued in batch) - loop.time()
        for queued in batch:
            if queued.timer is not None:
                queued.timer.cancel()
            if queued.deadline < loop.time() + timeout_s:  # fails alone at its deadline
                queued.timer = loop.call_at(queued.deadline, self._late, queued)
        try:
            scores = await self._inner.predict(
                rows, max(timeout_s, 0.0), budget_limited=all(q.budget_limited for q in batch)
            )
        except ModelInputError as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
            else:  # whose rows? each alone finds out, without failing the others
                await asyncio.gather(*(self._score([queued]) for queued in batch))
            return
        except ModelCallError as exc:
            self._fail(batch, exc)
            return
        except BaseException as exc:  # a waiter left unanswered would hang its caller
            self._fail(batch, ModelUnavailable(f"{self.name} call failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise  # cancelled (stop): the callers are answered, the task ends
            log.exception("%s: batched call failed unexpectedly", self.name)
            return
        self._calls += 1
        self._rows += len(rows)
        self._requests += len(batch)
        if self._answered:
            self._expected_ms += EXPECTED_WEIGHT * (scores.elapsed_ms - self._expected_ms)
        else:
            self._expected_ms, self._answered = scores.elapsed_ms, True
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

    def _late(self, queued: _Queued) -> None:
        if not queued.future.done():
            queued.future.set_exception(
                ModelTimeout(
                    f"{self.name} deadline exceeded after"
                    f" {(time.perf_counter() - queued.enqueued) * 1000:.1f} ms",
                    budget_limited=queued.budget_limited,
                )
            )

    @staticmethod
    def _fail(batch: list[_Queued], exc: ModelCallError | ModelInputError) -> None:
        for queued in batch:
            if not queued.future.done():
                queued.future.set_exception(_clone(exc))
