"""The call tally's arithmetic, on counts this test sets (the live counts: test_stream_cap)."""

from __future__ import annotations

from server.audit.journal import JournalWriteError
from server.audit.record import CallTallyRecord
from server.call_tally import CallTally
from server.load_metrics import CoreCalls


class Counts:
    """gRPC's core counts and the calls in flight, as the test moves them."""

    def __init__(self) -> None:
        self.started = self.answered = self.failed = self.in_flight = 0
        self.now_us = 1_000_000
        self.unreadable = False

    def core(self) -> CoreCalls:
        if self.unreadable:
            raise AttributeError("channelz: no servers")  # as a version skew might
        return CoreCalls(self.started, self.answered, self.failed)

    def calls(
        self, *, answered: int = 0, failed: int = 0, refused: int = 0, opened: int = 0
    ) -> None:
        """Calls that ended in each way, and ``opened`` more still being decided."""
        self.started += answered + failed + refused + opened
        self.answered += answered
        self.failed += failed
        self.in_flight += opened
        self.now_us += 60_000_000

    def finish(self, answered: int) -> None:
        self.answered += answered
        self.in_flight -= answered
        self.now_us += 1_000_000


class Journal:
    """Keeps what it is given; refuses the first ``failures`` as a full disk would."""

    server_id = "pod-1:50051"

    def __init__(self, failures: int = 0) -> None:
        self.records: list[CallTallyRecord] = []
        self._failures = failures

    def record_calls(self, tally: CallTallyRecord) -> None:
        if self._failures:
            self._failures -= 1
            raise JournalWriteError("disk full")
        self.records.append(tally)


def tally_of(counts: Counts, journal: Journal) -> CallTally:
    return CallTally(
        journal, lambda: counts.in_flight, core_calls=counts.core, clock_us=lambda: counts.now_us
    )


async def test_each_tally_counts_the_calls_since_the_last_and_the_in_flight_ones_when_they_end():
    counts, journal = Counts(), Journal()
    tally = tally_of(counts, journal)
    await tally.start()
    counts.calls(answered=900, failed=3, refused=40, opened=5)
    tally.journal()
    counts.finish(answered=5)
    tally.journal()
    await tally.stop()  # a last row, of nothing

    first, second, last = journal.records
    assert (first.calls_started, first.calls_answered, first.calls_failed) == (948, 900, 3)
    assert first.calls_refused == 40  # the 5 still being decided are not refusals
    assert (second.calls_started, second.calls_answered, second.calls_refused) == (0, 5, 0)
    assert (first.from_us, first.to_us, second.from_us) == (1_000_000, 61_000_000, 61_000_000)
    assert first.server_id == "pod-1:50051"
    assert (last.calls_started, last.calls_refused) == (0, 0)


async def test_a_tally_not_journalled_is_counted_in_the_next():
    counts, journal = Counts(), Journal(failures=1)
    tally = tally_of(counts, journal)
    await tally.start()
    counts.calls(answered=10, refused=2)
    tally.journal()  # the journal refused it: logged, not raised, the server goes on
    counts.calls(answered=7, refused=1)
    counts.unreadable = True
    tally.journal()  # channelz failed: the same
    counts.unreadable = False
    tally.journal()
    await tally.stop()

    only, _last = journal.records
    assert (only.from_us, only.calls_answered, only.calls_refused) == (1_000_000, 17, 3)


async def test_stopping_journals_the_last_tally():
    counts, journal = Counts(), Journal()
    tally = tally_of(counts, journal)
    await tally.start()
    counts.calls(answered=3, refused=1)
    await tally.stop()
    await tally.stop()  # idempotent: no second row
    assert [(t.calls_answered, t.calls_refused) for t in journal.records] == [(3, 1)]
