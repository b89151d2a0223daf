"""Probe calls for breakers no request tries (pure logic: the replica is a fake)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import pytest

from core.domain import Source
from server.breaker import AsyncCircuitBreaker
from server.breaker_probe import PROBE_ROW, BreakerProbe
from server.control.state import Change, ControlState, Entry
from server.model_client import ModelScores
from server.model_errors import ModelInputError, ModelUnavailable
from server.replica import Replica
from tests.server.fakes import AlwaysConnected

pytestmark = pytest.mark.timed  # a 50 ms reset timeout, probes of 25 ms

RESET_S = 0.05
SUCCESSES_TO_CLOSE = 3


class FakeReplica(AlwaysConnected):
    name = "secondary"
    model_name = "champion"

    def __init__(self) -> None:
        self.down = False
        self.rejects = False
        self.rows: list[Sequence[Sequence[float]]] = []

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        self.rows.append(rows)
        if self.rejects:
            raise ModelInputError("secondary rejected the rows: wrong width")
        if self.down:
            raise ModelUnavailable("secondary unavailable")
        return ModelScores("champion", "v1", [0.5] * len(rows), 1.0)


def replica(fake: FakeReplica) -> Replica:
    breaker = AsyncCircuitBreaker(
        fake.name, fail_max=1, reset_timeout_s=RESET_S, success_threshold=SUCCESSES_TO_CLOSE
    )
    return Replica(client=fake, breaker=breaker, source=Source.SECONDARY)


def probe(replicas: Sequence[Replica], state: ControlState | None = None) -> BreakerProbe:
    return BreakerProbe(
        replicas,
        interval_s=0.01,
        call_timeout_ms=25.0,
        control=lambda: state or ControlState(),
        calls_to_close=SUCCESSES_TO_CLOSE,
    )


async def opened(fake: FakeReplica, target: Replica) -> None:
    """Opens the breaker with one failed call and waits out its reset timeout."""
    fake.down = True
    with contextlib.suppress(ModelUnavailable):
        await target.breaker.call(lambda: fake.predict([[0.0]], 1.0))
    assert target.breaker.state == "open"
    fake.down = False
    fake.rows.clear()
    await asyncio.sleep(RESET_S * 1.5)


async def test_an_open_breaker_no_request_tries_is_closed_by_probe_calls() -> None:
    fake = FakeReplica()
    target = replica(fake)
    await opened(fake, target)
    prober = probe([target])
    await prober.probe(target)
    assert target.breaker.state == "closed"
    assert fake.rows == [[PROBE_ROW]] * SUCCESSES_TO_CLOSE
    await prober.probe(target)  # closed: nothing to try
    assert prober.calls == SUCCESSES_TO_CLOSE


async def test_a_failing_probe_reopens_the_breaker_and_stops() -> None:
    fake = FakeReplica()
    target = replica(fake)
    await opened(fake, target)
    fake.down = True
    prober = probe([target])
    await prober.probe(target)
    assert (target.breaker.state, prober.calls) == ("open", 1)
    await prober.probe(target)  # within the reset timeout again: no call
    assert prober.calls == 1


async def test_a_breaker_still_within_its_reset_timeout_is_not_probed() -> None:
    fake = FakeReplica()
    target = replica(fake)
    fake.down = True
    with contextlib.suppress(ModelUnavailable):
        await target.breaker.call(lambda: fake.predict([[0.0]], 1.0))
    fake.rows.clear()
    prober = probe([target])
    await prober.probe(target)
    assert (target.breaker.state, fake.rows) == ("open", [])


async def test_a_replica_forced_open_or_closed_by_on_call_is_left_alone() -> None:
    for mode in ("FORCE_OPEN", "FORCE_CLOSED"):
        fake = FakeReplica()
        target = replica(fake)
        await opened(fake, target)
        forced = ControlState.from_entries(
            1, {"breaker:secondary": Entry(mode, Change("alice", "test", 0))}, {}
        )
        prober = probe([target], forced)
        await prober.probe(target)
        assert (target.breaker.state, fake.rows) == ("open", []), mode


async def test_the_running_probe_closes_idle_breakers_and_drops_a_replica_rejecting_its_row():
    fake, rejecting = FakeReplica(), FakeReplica()
    target, other = replica(fake), replica(rejecting)
    await opened(fake, target)
    await opened(rejecting, other)
    rejecting.rejects = True
    prober = probe([other, target])
    await prober.start()
    try:
        for _ in range(100):
            if target.breaker.state == "closed":
                break
            await asyncio.sleep(0.01)
        assert target.breaker.state == "closed"
        await asyncio.sleep(0.05)
        assert len(rejecting.rows) == 1  # tried once, then no more
    finally:
        await prober.stop()
