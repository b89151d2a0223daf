"""Refused calls, audited in aggregate.

A call gRPC's core refuses (past the queue limit) makes no decision, so it has no
decision record. ``CallTally`` journals a ``CallTallyRecord`` every
``CALL_TALLY_INTERVAL_S`` and once more when the server stops: the calls the core
started, answered, failed and refused in that interval, from its own counts (channelz).
An auditor finds every call that reached a server either as a decision or in a tally.
How to read the rows, and how far one can be off: docs/audit.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Self

from core.tasks import cancel_and_wait
from server.audit.record import CallTallyRecord
from server.load_metrics import CoreCalls, core_calls

log = logging.getLogger(__name__)

# An auditor's resolution: a row a minute per server process, 1,440 a day.
CALL_TALLY_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class _Mark:
    at_us: int
    calls: CoreCalls
    in_flight: int


class TallyJournal(Protocol):
    """Where tallies go: the audit trail."""

    server_id: str

    def record_calls(self, record: CallTallyRecord) -> None: ...


class CallTally:
    """A tally that fails (the journal's disk, a channelz read) is logged, and the next
    tally covers its interval too."""

    def __init__(
        self,
        journal: TallyJournal,
        in_flight: Callable[[], int],
        *,
        core_calls: Callable[[], CoreCalls] = core_calls,
        interval_s: float = CALL_TALLY_INTERVAL_S,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        """``in_flight``: the calls being decided now; one in flight at an interval's end
        is neither answered nor refused yet, and is counted when it ends."""
        self._journal = journal
        self._in_flight = in_flight
        self._core_calls = core_calls
        self._interval_s = interval_s
        self._clock_us = clock_us
        self._since: _Mark | None = None
        self._task: asyncio.Task[None] | None = None

    def _mark(self) -> _Mark:
        return _Mark(self._clock_us(), self._core_calls(), self._in_flight())

    def _tally(self, since: _Mark, now: _Mark) -> CallTallyRecord:
        started = now.calls.started - since.calls.started
        answered = now.calls.succeeded - since.calls.succeeded
        failed = now.calls.failed - since.calls.failed
        # Refused: started, neither answered nor failed, less the growth of the calls being
        # decided. Calls waiting in the core's queue at an end (at most QUEUED_CALLS_MAX)
        # count as refused in this row and are taken back in the next when answered.
        return CallTallyRecord(
            server_id=self._journal.server_id,
            from_us=since.at_us,
            to_us=now.at_us,
            calls_started=started,
            calls_answered=answered,
            calls_failed=failed,
            calls_refused=started - answered - failed - (now.in_flight - since.in_flight),
        )

    def journal(self) -> None:
        """Journals the calls since the last tally journalled (or since the start); the
        next tally starts where this one ends. Never raises: the server goes on."""
        if self._since is None:
            return
        try:
            now = self._mark()
            self._journal.record_calls(self._tally(self._since, now))
        except Exception:  # the next tally covers this interval too
            log.exception("call tally not journalled (the next one covers it)")
            return
        self._since = now

    async def start(self) -> None:
        """Counts from now: before the gRPC servers start, so that every call they start
        is in a row."""
        if self._task is None:
            self._since = self._mark()
            self._task = asyncio.create_task(self._every_interval())

    async def stop(self) -> None:
        """Idempotent. The last tally, up to now: taken as the server begins to stop,
        before its gRPC servers do (channelz forgets a stopped server). Calls in flight
        then finish in the grace period, each in the audit trail as a decision."""
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        self.journal()
        self._since = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.journal()
