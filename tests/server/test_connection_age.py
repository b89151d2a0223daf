"""server.max_connection_age_s: a connection is closed gracefully at that age, so that a
client balancing over a headless Service reconnects and re-resolves (new pods join)."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

import server.front
from decision_client.stream import DecideStreamClient
from server.app import DecisionApp
from tests.server.conftest import buy, decision_stub

pytestmark = [pytest.mark.integration, pytest.mark.timed]

READY = grpc.ChannelConnectivity.READY


async def state_after(app: DecisionApp, wait_s: float) -> grpc.ChannelConnectivity:
    """The channel's state ``wait_s`` after a call that succeeded; then another call
    succeeds too (a closed connection is reopened)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = decision_stub(channel)
        assert (await stub.Decide(buy(), timeout=5.0)).decision_id
        assert channel.get_state() == READY
        await asyncio.sleep(wait_s)
        state = channel.get_state()
        assert (await stub.Decide(buy(), timeout=5.0)).decision_id
        return state


async def test_an_aged_connection_is_closed_and_the_client_reconnects(start_app) -> None:
    aging = await start_app(server={"max_connection_age_s": 0.5})
    assert await state_after(aging, 1.5) != READY


async def test_by_default_a_connection_is_kept(start_app) -> None:
    keeping = await start_app()
    assert await state_after(keeping, 1.5) == READY


async def test_a_stream_cut_at_the_connections_age_loses_no_order(start_app, monkeypatch):
    """Past its age and grace a connection is cut with its DecideStream: the client opens
    a new stream and resends what was unanswered, so every order gets its answer."""
    monkeypatch.setattr(server.front, "CONNECTION_AGE_GRACE_MS", 200)
    aging = await start_app(server={"max_connection_age_s": 0.3})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{aging.port}") as channel:
        client = DecideStreamClient(channel)

        async def sender(name: str) -> list[str]:
            answered: list[str] = []
            loop = asyncio.get_running_loop()
            until = loop.time() + 2.0
            for i in itertools.count():
                if loop.time() > until:
                    return answered
                answer = await client.decide(buy(request_id=f"{name}-{i}"), timeout_s=2.0)
                answered.append(answer.request_id)
                await asyncio.sleep(0.005)
            return answered

        answered = await asyncio.gather(*(sender(f"s{n}") for n in range(4)))
        await client.close()
    assert client.streams_opened >= 2  # the first was cut
    assert all(len(a) > 20 for a in answered), [len(a) for a in answered]
