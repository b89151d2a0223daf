"""BatchingClient's queueing, splitting and deadlines (pure logic: the replica is a fake
whose call takes a fixed time whatever its rows, as TorchServe's does for up to 64;
the real replica is in tests/torchserve/test_served.py)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest

from server.batching import BatchingClient
from server.model_client import ModelScores
from server.model_errors import (
    ModelBusy,
    ModelInputError,
    ModelNoTime,
    ModelTimeout,
    ModelUnavailable,
)
from server.replicas import Replicas
from server.settings import Settings, TorchServeSettings
from server.tracing import Tracing
from tests.server.fakes import AlwaysConnected

pytestmark = pytest.mark.timed  # budgets of a few ms, spent while the test runs


class FakeReplica(AlwaysConnected):
    name = "primary"
    model_name = "champion"

    def __init__(self, call_ms: float = 5.0) -> None:
        self.call_s = call_ms / 1000.0
        self.calls: list[int] = []  # rows per call
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail: Exception | None = None
        # When set, a call answers when it opens, not after ``call_ms`` (which it still
        # reports as its time): a test decides when the replica is done.
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()  # set as each call comes in

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        self.calls.append(len(rows))
        self.entered.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if any(row[0] < 0 for row in rows):
                raise ModelInputError("primary rejected the rows: negative value")
            if self.call_s > timeout_s:
                await asyncio.sleep(timeout_s)
                raise ModelTimeout("primary deadline exceeded", given_ms=timeout_s * 1000)
            await (self.gate.wait() if self.gate is not None else asyncio.sleep(self.call_s))
            if self.fail is not None:
                raise self.fail
            # A row's score is its first value: each caller can check it got its own.
            return ModelScores("champion", "v1", [row[0] for row in rows], self.call_s * 1000)
        finally:
            self.in_flight -= 1


def client(replica: FakeReplica, *, max_rows: int = 64, max_calls: int = 1) -> BatchingClient:
    return BatchingClient(replica, max_batch_rows=max_rows, max_concurrent_calls=max_calls)


async def test_concurrent_requests_share_calls_and_each_gets_its_own_scores() -> None:
    replica = FakeReplica()
    batching = client(replica, max_calls=1)
    requests = [[[i / 100, 0.0]] for i in range(20)] + [[[0.5, 0.0], [0.6, 0.0]]]
    answers = await asyncio.gather(*(batching.predict(rows, 1.0) for rows in requests))
    assert [a.scores for a in answers] == [[row[0] for row in rows] for rows in requests]
    # All arrived in one loop turn: one call carried them all.
    assert replica.calls == [22]
    assert batching.stats().requests == 21


async def test_the_replica_never_has_more_calls_than_the_cap_and_calls_stay_within_max_rows() -> (
    None
):
    replica = FakeReplica(call_ms=3.0)
    batching = client(replica, max_rows=8, max_calls=2)

    async def caller(i: int) -> list[float]:
        await asyncio.sleep(i * 0.0005)  # spread over several calls
        return (await batching.predict([[i / 1000, 1.0]], 1.0)).scores

    answers = await asyncio.gather(*(caller(i) for i in range(60)))
    assert answers == [[i / 1000] for i in range(60)]
    assert replica.most_in_flight <= 2
    assert max(replica.calls) <= 8
    assert len(replica.calls) < 60  # some coalesced


async def test_a_lone_request_is_sent_at_once() -> None:
    replica = FakeReplica(call_ms=1.0)
    batching = client(replica)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await batching.predict([[0.1]], 1.0)
    assert loop.time() - started < 0.05  # no window: no timer stood between
    assert replica.calls == [1]


async def test_a_request_with_no_time_to_wait_for_the_busy_replica_leaves_unsent() -> None:
    # One call at a time, each 20 ms: a queued request behind it waits ~20 ms. Those
    # whose deadline leaves room for the wait and a call share the next call; the others
    # leave the queue unsent, not counted against the replica, and no second call is out.
    replica = FakeReplica(call_ms=20.0)
    batching = client(replica, max_calls=1)
    await batching.predict([[0.0]], 1.0)  # teaches it the expected call time
    first = asyncio.create_task(batching.predict([[0.0]], 1.0))
    await asyncio.sleep(0.001)  # the replica is busy with ``first``
    # 100 ms leaves room to wait for ``first`` (~20 ms) and then share a call (20 ms).
    roomy = [asyncio.create_task(batching.predict([[0.3 + i / 100]], 0.1)) for i in range(3)]
    answers = await asyncio.gather(first, *roomy)
    assert [a.scores for a in answers[1:]] == [[0.3], [0.31], [0.32]]
    assert replica.calls[-1] == 3
    assert batching.stats().out_of_time == 0
    # The replica now holds its call: a request given 30 ms cannot wait for it and then
    # make a 20 ms call; it gives up when only a call's time is left (at 30 - 20 ms),
    # long before its deadline, and is never sent.
    replica.gate, replica.entered = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(batching.predict([[0.0]], 1.0))
    await replica.entered.wait()  # the replica holds ``first``'s call
    calls_before = len(replica.calls)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ModelNoTime, match="primary busy: 1 call") as unsent:
        await batching.predict([[0.7]], 0.030)
    assert 0.009 < loop.time() - started < 0.030
    assert not unsent.value.counts_against_replica
    assert batching.stats().out_of_time == 1
    replica.gate.set()
    await first
    assert len(replica.calls) == calls_before  # never sent
    assert replica.most_in_flight == 1


async def test_a_queued_request_goes_when_the_call_ahead_ends_in_its_time() -> None:
    # 60 ms given, 20 ms calls: it would give up at 40 ms; the call ahead ends at ~10 ms
    # and it goes in the next one, first in line.
    replica = FakeReplica(call_ms=20.0)
    batching = client(replica, max_calls=1)
    await batching.predict([[0.0]], 1.0)  # teaches it the expected call time
    replica.gate, replica.entered = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(batching.predict([[0.0]], 1.0))
    await replica.entered.wait()  # the replica holds ``first``'s call
    waiting = asyncio.create_task(batching.predict([[0.4]], 0.060))
    await asyncio.sleep(0.01)
    replica.gate.set()
    assert (await waiting).scores == [0.4]
    assert batching.stats().out_of_time == 0
    await first


async def test_each_request_keeps_its_own_deadline_in_a_shared_call() -> None:
    replica = FakeReplica(call_ms=30.0)
    batching = client(replica, max_calls=1)
    short = asyncio.create_task(batching.predict([[0.1]], 0.01))
    long = asyncio.create_task(batching.predict([[0.2]], 1.0))
    with pytest.raises(ModelTimeout):
        await short  # it would have timed out alone too: the call takes 30 ms
    assert (await long).scores == [0.2]
    assert replica.calls == [2]


async def test_a_bad_row_fails_only_its_own_request() -> None:
    replica = FakeReplica(call_ms=1.0)
    batching = client(replica)
    good, bad, other = await asyncio.gather(
        batching.predict([[0.1]], 1.0),
        batching.predict([[-1.0]], 1.0),
        batching.predict([[0.3]], 1.0),
        return_exceptions=True,
    )
    assert isinstance(good, ModelScores) and good.scores == [0.1]
    assert isinstance(other, ModelScores) and other.scores == [0.3]
    assert isinstance(bad, ModelInputError)
    assert replica.calls == [3, 1, 1, 1]  # the shared call, then each alone


async def test_a_failed_call_fails_each_of_its_requests_with_its_own_error() -> None:
    replica = FakeReplica(call_ms=1.0)
    replica.fail = ModelUnavailable("primary unavailable after 1.0 ms")
    batching = client(replica)
    errors = await asyncio.gather(
        *(batching.predict([[0.1]], 1.0) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(e, ModelUnavailable) for e in errors)
    assert len({id(e) for e in errors}) == 3


@pytest.mark.parametrize("silent_ms", [25.0, 0.0])
async def test_a_refused_call_tells_each_request_how_long_the_replica_is_silent(
    silent_ms: float,
) -> None:
    replica = FakeReplica(call_ms=1.0)
    replica.fail = ModelBusy("primary busy: 16 abandoned calls still out", silent_ms=silent_ms)
    batching = client(replica)
    errors = await asyncio.gather(
        *(batching.predict([[0.1]], 1.0) for _ in range(3)), return_exceptions=True
    )
    for error in errors:
        assert isinstance(error, ModelBusy) and error.silent_ms == silent_ms, error
        assert error.counts_against_replica is (silent_ms > 0)


async def test_a_cancelled_caller_is_not_sent() -> None:
    replica = FakeReplica(call_ms=10.0)
    batching = client(replica, max_calls=1)
    first = asyncio.create_task(batching.predict([[0.1]], 1.0))
    await asyncio.sleep(0.001)
    gone = asyncio.create_task(batching.predict([[0.2]], 1.0))
    await asyncio.sleep(0.001)
    gone.cancel()
    kept = await batching.predict([[0.3]], 1.0)
    await first
    assert kept.scores == [0.3]
    assert replica.calls == [1, 1]


async def test_a_call_nobody_waits_for_any_more_is_cancelled_and_frees_its_slot() -> None:
    replica = FakeReplica(call_ms=200.0)
    batching = client(replica, max_calls=1)
    abandoned = asyncio.create_task(batching.predict([[0.1]], 1.0))  # its caller gone
    await asyncio.sleep(0.01)
    abandoned.cancel()
    await asyncio.sleep(0.01)
    assert replica.in_flight == 0  # the model call was cancelled with it
    replica.call_s = 0.001
    assert (await batching.predict([[0.2]], 1.0)).scores == [0.2]  # the slot is free


async def test_a_timeout_after_waiting_in_the_queue_is_not_the_replicas_fault() -> None:
    replica = FakeReplica(call_ms=30.0)
    batching = BatchingClient(replica, max_batch_rows=64, max_concurrent_calls=1)
    await batching.predict([[0.0]], 1.0)  # expected call time: 30 ms
    # Alone, with 29 ms for a 30 ms call: the replica's timeout, counted (less what the
    # loop took to start it on a slow host: 1.5 ms in CI, 2026-11-29).
    with pytest.raises(ModelTimeout) as counted:
        await batching.predict([[0.1]], 0.029)
    assert 20.0 <= counted.value.given_ms <= 29.0
    assert counted.value.counts_against_replica
    # In a shared call that outlives it, with 5 ms of its own: not the replica's fault.
    first = asyncio.create_task(batching.predict([[0.2]], 1.0))
    short = asyncio.create_task(batching.predict([[0.3]], 0.005))
    with pytest.raises(ModelTimeout) as limited:
        await short
    assert limited.value.given_ms <= 5.0
    assert not limited.value.counts_against_replica
    await first


async def test_stopping_answers_every_waiter() -> None:
    replica = FakeReplica(call_ms=5000.0)
    batching = client(replica, max_calls=1)
    waiting = [asyncio.create_task(batching.predict([[i / 10]], 10.0)) for i in range(3)]
    await asyncio.sleep(0)  # queued; the flush has not run yet
    await batching.stop()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, ModelUnavailable) for r in results), results


REQUEST = contextvars.ContextVar("request", default="none")


class ContextReplica(FakeReplica):
    """Records the request context each call runs in."""

    def __init__(self) -> None:
        super().__init__(call_ms=5.0)
        self.seen: list[str] = []

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        self.seen.append(REQUEST.get())
        return await super().predict(rows, timeout_s)


async def test_each_call_runs_in_its_first_requests_context_not_an_earlier_ones() -> None:
    """A call (its RPC's span, its log lines) belongs to a request of its own batch, even
    when it was started by the previous call's end, long after that call's requests."""
    replica = ContextReplica()
    batching = client(replica, max_calls=1)

    async def request(name: str) -> ModelScores:
        REQUEST.set(name)
        return await batching.predict([[0.1, 0.0]], 1.0)

    first = asyncio.create_task(request("first"))
    await asyncio.sleep(0)  # the first call goes out; the next two queue behind it
    queued = [asyncio.create_task(request(name)) for name in ("second", "third")]
    await asyncio.gather(first, *queued)
    later = await asyncio.create_task(request("later"))
    assert later.scores == [0.1]
    assert replica.seen == ["first", "second", "later"]


def test_each_champion_has_one_call_out_and_the_challenger_several_for_torchserve_to_batch() -> (
    None
):
    settings = Settings(
        torchserve=TorchServeSettings(challenger_address="127.0.0.1:9"),
    )
    replicas = Replicas.build(settings, Tracing(None))
    calls_out = {
        r.name: r.client.max_concurrent_calls
        for r in replicas.all
        if isinstance(r.client, BatchingClient)
    }
    assert calls_out == {"primary": 1, "secondary": 1, "challenger": 4}
