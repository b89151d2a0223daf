"""Refused calls, audited in aggregate.

A call gRPC's core refuses (past the queue limit: cancelled before any handler runs)
makes no decision, so it has no decision record. ``CallTally`` journals, once a
``CALL_TALLY_INTERVAL_S`` and once more when the server stops, one ``CallTallyRecord``:
the calls the core started, answered, failed and refused in that interval, from the
core's own counts (channelz). An auditor finds every call that reached a server either
as a decision or in a tally.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.tasks import cancel_and_wait
from server.audit.journal import JournalError
from server.audit.record import CallTallyRecord

log = logging.getLogger(__name__)

# An auditor's resolution: a row a minute per server process, 1,440 a day.
CALL_TALLY_INTERVAL_S = 60.0

CoreCounts = tuple[int, int, int]
"""Calls started, finished OK and finished with an error, since the process started."""


@dataclass(frozen=True, slots=True)
class _Mark:
    at_us: int
    counts: CoreCounts
    in_flight: int


class CallTally:
    """``record`` journals a tally; one that fails (the journal's disk) is logged, and the
    next tally covers its interval too."""

    def __init__(
        self,
        server_id: Callable[[], str],
        core_counts: Callable[[], CoreCounts],
        in_flight: Callable[[], int],
        record: Callable[[CallTallyRecord], None],
        *,
        interval_s: float = CALL_TALLY_INTERVAL_S,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        """``in_flight``: the calls being decided now; one in flight at an interval's end
        is neither answered nor refused yet, and is counted when it ends."""
        self._server_id = server_id
        self._core_counts = core_counts
        self._in_flight = in_flight
        self._record = record
        self._interval_s = interval_s
        self._clock_us = clock_us
        self._since = self._mark()
        self._task: asyncio.Task[None] | None = None

    def _mark(self) -> _Mark:
        return _Mark(self._clock_us(), self._core_counts(), self._in_flight())

    def _tally(self, since: _Mark, now: _Mark) -> CallTallyRecord:
        started, answered, failed = (n - m for n, m in zip(now.counts, since.counts, strict=True))
        return CallTallyRecord(
            server_id=self._server_id(),
            from_us=since.at_us,
            to_us=now.at_us,
            calls_started=started,
            calls_answered=answered,
            calls_failed=failed,
            calls_refused=started - answered - failed - (now.in_flight - since.in_flight),
        )

    def journal(self) -> None:
        """Journals the calls since the last tally journalled (or since the start); the
        next tally starts where this one ends."""
        now = self._mark()
        try:
            self._record(self._tally(self._since, now))
        except JournalError as exc:
            log.error("call tally not journalled (the next one covers it): %s", exc)
            return
        self._since = now

    async def start(self) -> None:
        self._since = self._mark()
        self._task = asyncio.create_task(self._every_interval())

    async def stop(self) -> None:
        """The last tally, up to now. Stopped before the gRPC servers (channelz forgets a
        stopped server): the calls still in flight finish in their grace period, each in
        the audit trail as a decision."""
        await cancel_and_wait(self._task)
        self.journal()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.journal()
