"""When a refused model call (``ModelBusy``) counts against the replica (pure logic: a
client whose calls are scripted coroutines, no replica)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from core import deadline
from server.model_client import GrpcModelClient
from server.model_errors import ModelBusy, ModelTimeout

Call = Callable[[float], Awaitable[str]]


class ScriptedClient(GrpcModelClient):
    """Runs the coroutine it is given, as a task, in place of an RPC."""

    def _bind(self, channel: grpc.aio.Channel) -> None:
        pass

    async def answer(self, call: Call, timeout_s: float) -> str:
        response, _ = await self._call(
            lambda wire_timeout_s: asyncio.ensure_future(call(wire_timeout_s)), timeout_s
        )
        return response


@pytest.fixture
async def replica() -> AsyncIterator[tuple[ScriptedClient, asyncio.Event, Call, Call]]:
    client = ScriptedClient("primary", "127.0.0.1:9", "champion", max_abandoned_calls=2)
    await client.start()  # a lazy channel: nothing connects
    wakes = asyncio.Event()

    async def hung(_wire_timeout_s: float) -> str:
        await wakes.wait()
        return "late"

    async def quick(_wire_timeout_s: float) -> str:
        return "answer"

    yield client, wakes, hung, quick
    wakes.set()
    await client.stop()


async def test_a_replica_that_answers_none_of_its_abandoned_calls_is_at_fault(replica, monkeypatch):
    client, _, hung, quick = replica
    assert await client.answer(quick, 1.0) == "answer"
    for _ in range(2):
        with pytest.raises(ModelTimeout):
            await client.answer(hung, 0.001)
    # Silent for less than a timeout that counts (1 s here, so that a stalled test
    # machine cannot reach it): calls given 1 ms each are abandoned faster than a slowed
    # replica answers; not yet its fault.
    with pytest.raises(ModelBusy, match="none answered for") as refused:
        await client.answer(quick, 1.0)
    assert 0 < refused.value.silent_ms < 1000.0
    with monkeypatch.context() as patched:
        patched.setattr(deadline, "MIN_COUNTED_TIMEOUT_MS", 1000.0)
        assert not refused.value.counts_against_replica
    await asyncio.sleep(0.015)  # still no answer: longer than a 10 ms counted timeout
    with pytest.raises(ModelBusy, match="none answered for") as refused:
        await client.answer(quick, 1.0)
    assert refused.value.silent_ms >= 15.0
    assert refused.value.counts_against_replica


async def test_a_replica_that_answered_since_its_first_abandoned_call_is_not(replica, monkeypatch):
    client, wakes, hung, quick = replica
    with pytest.raises(ModelTimeout):
        await client.answer(hung, 0.001)
    assert await client.answer(quick, 1.0) == "answer"  # it answers, if slowly
    with pytest.raises(ModelTimeout):
        await client.answer(hung, 0.001)
    with pytest.raises(ModelBusy) as refused:
        await client.answer(quick, 1.0)
    assert refused.value.silent_ms == 0
    assert not refused.value.counts_against_replica
    monkeypatch.setattr(deadline, "MIN_COUNTED_TIMEOUT_MS", 0.0)
    assert not refused.value.counts_against_replica

    wakes.set()  # the abandoned calls end and the replica is called again
    for _ in range(10):
        await asyncio.sleep(0)
    assert client.abandoned().outstanding == 0
    assert await client.answer(quick, 1.0) == "answer"


async def test_an_answer_that_came_before_a_call_was_abandoned_does_not_excuse_the_replica(
    replica,
):
    client, _, hung, quick = replica
    first = asyncio.ensure_future(client.answer(hung, 0.05))
    await asyncio.sleep(0)  # the first call is out ...
    assert await client.answer(quick, 1.0) == "answer"  # ... when a later one is answered
    with pytest.raises(ModelTimeout):
        await first  # abandoned after that answer
    with pytest.raises(ModelTimeout):
        await client.answer(hung, 0.001)
    with pytest.raises(ModelBusy, match="none answered") as refused:
        await client.answer(quick, 1.0)
    assert refused.value.silent_ms > 0
