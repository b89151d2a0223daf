"""ShadowScorer's gathering of sampled decisions into challenger calls (pure logic: the
challenger is a fake client; the real replica is in tests/server/admin/test_admin.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from core.domain import Source
from server.audit.record import ShadowRecord
from server.breaker import AsyncCircuitBreaker
from server.control.state import Change, ControlState, Entry
from server.model_client import ModelScores
from server.model_errors import ModelTimeout
from server.replica import Replica
from server.shadow import Shadowed, ShadowScorer
from tests.server.fakes import AlwaysConnected


class FakeChallenger(AlwaysConnected):
    name = "challenger"
    model_name = "challenger"

    def __init__(self) -> None:
        self.calls: list[int] = []  # rows per call
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        self.calls.append(len(rows))
        await self.release.wait()
        if self.fail:
            raise ModelTimeout("timed out", given_ms=timeout_s * 1000)
        return ModelScores("challenger", "v2", [row[0] for row in rows], elapsed_ms=1.0)


class Recorded:
    def __init__(self) -> None:
        self.records: list[ShadowRecord] = []

    def record_shadow(self, records: Sequence[ShadowRecord]) -> None:
        self.records.extend(records)


def scorer(
    challenger: FakeChallenger,
    audit: Recorded,
    *,
    window_ms: float = 20.0,
    max_rows: int = 8,
    max_in_flight: int = 2,
) -> ShadowScorer:
    replica = Replica(
        client=challenger,
        breaker=AsyncCircuitBreaker("challenger", fail_max=5, reset_timeout_s=1.0),
        source=Source.CANARY,
    )
    return ShadowScorer(
        replica,
        audit=audit,
        max_in_flight=max_in_flight,
        timeout_ms=100.0,
        threshold=0.5,
        psi_window=100,
        batch_window_ms=window_ms,
        batch_max_rows=max_rows,
    )


def submit(shadow: ShadowScorer, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        # The fake challenger scores a row with its first value.
        shadow.submit([[0.9]], [Shadowed(f"d{i}", 0.6, trade=True)], ControlState(), 0)


async def test_decisions_within_the_window_share_one_call() -> None:
    challenger, audit = FakeChallenger(), Recorded()
    shadow = scorer(challenger, audit, window_ms=30.0)
    submit(shadow, 5)
    assert challenger.calls == []  # gathered, not sent yet
    assert shadow.stats().in_flight == 5
    await asyncio.sleep(0.1)
    assert challenger.calls == [5]
    assert [r.decision_id for r in audit.records] == [f"d{i}" for i in range(5)]
    stats = shadow.stats()
    assert (stats.sampled, stats.scored, stats.agreed, stats.in_flight) == (5, 5, 5, 0)


async def test_a_full_batch_goes_at_once_and_the_rest_waits_for_the_window() -> None:
    challenger, audit = FakeChallenger(), Recorded()
    shadow = scorer(challenger, audit, window_ms=1000.0, max_rows=4)
    submit(shadow, 6)
    await asyncio.sleep(0)  # the full batch's task starts
    assert challenger.calls == [4]
    await shadow.stop()  # sends what is gathered
    assert challenger.calls == [4, 2]
    assert len(audit.records) == 6


async def test_a_zero_window_sends_every_decision_alone() -> None:
    challenger, audit = FakeChallenger(), Recorded()
    shadow = scorer(challenger, audit, window_ms=0.0)
    submit(shadow, 2)
    await asyncio.sleep(0)
    assert challenger.calls == [1, 1]
    await shadow.stop()


async def test_a_batch_due_while_calls_are_saturated_is_dropped_not_queued() -> None:
    challenger, audit = FakeChallenger(), Recorded()
    challenger.release.clear()  # calls hang until released
    shadow = scorer(challenger, audit, window_ms=0.0, max_in_flight=2)
    submit(shadow, 5)
    await asyncio.sleep(0)
    assert challenger.calls == [1, 1]
    stats = shadow.stats()
    assert (stats.sampled, stats.dropped, stats.in_flight) == (5, 3, 2)
    challenger.release.set()
    await shadow.stop()
    stats = shadow.stats()
    assert (stats.scored, stats.dropped, stats.failed, stats.in_flight) == (2, 3, 0, 0)


async def test_failed_calls_and_a_forced_open_challenger_are_counted() -> None:
    challenger, audit = FakeChallenger(), Recorded()
    challenger.fail = True
    shadow = scorer(challenger, audit, window_ms=0.0)
    submit(shadow, 1)
    forced_open = ControlState(
        entries={"breaker:challenger": Entry("FORCE_OPEN", Change("on-call", "test", 0))}
    )
    shadow.submit([[0.9]], [Shadowed("forced", 0.6, trade=True)], forced_open, 0)
    await shadow.stop()
    stats = shadow.stats()
    assert (stats.sampled, stats.failed, stats.dropped, stats.scored) == (2, 1, 1, 0)
    assert challenger.calls == [1]  # the forced-open one was never sent
    assert audit.records == []
