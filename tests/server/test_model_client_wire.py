"""The model client's calls on the wire, against a replica double served in this process
by grpc.aio: a caller that stops waiting (its timeout, or its own cancellation) abandons
the call and never cancels it, with and without tracing's client interceptors on the
channel (they change how a call reports that it is done). The double speaks TorchServe's
``Predictions``; ``test_abandoned_calls`` does the same against TorchServe itself."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider

from core.processes import free_port
from feature_cache.schema import MODEL_INPUT_WIDTH, pack_rows
from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc
from server.model_client import TorchServeClient
from server.model_errors import ModelTimeout, ModelUnavailable

ROWS = [[0.1] * MODEL_INPUT_WIDTH]


class SlowReplica(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Answers every call after ``delay_s``; counts the calls it finished and those
    cancelled under it."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.finished = 0
        self.cancelled = 0

    async def Ping(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.TorchServeHealthResponse:
        return inference_pb2.TorchServeHealthResponse(health="Healthy")

    async def Predictions(
        self,
        request: inference_pb2.PredictionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> inference_pb2.PredictionResponse:
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        rows = len(request.input["rows"]) // (4 * MODEL_INPUT_WIDTH)
        document = {"scores": [0.5] * rows, "model_version": "v1"}
        return inference_pb2.PredictionResponse(prediction=json.dumps(document).encode())


@pytest.fixture
async def replica() -> AsyncIterator[tuple[SlowReplica, str]]:
    servicer = SlowReplica()
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


def interceptors(traced: bool) -> Sequence[grpc.aio.ClientInterceptor]:
    if not traced:
        return ()
    traced_interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(
        TracerProvider()
    )
    return traced_interceptors


@pytest.fixture(params=[False, True], ids=["plain", "traced"])
async def client(request: pytest.FixtureRequest, replica) -> AsyncIterator[TorchServeClient]:
    _, address = replica
    model_client = TorchServeClient(
        "primary", address, "champion", interceptors=interceptors(request.param)
    )
    await model_client.start()
    yield model_client
    await model_client.stop()


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within 5 s"
        await asyncio.sleep(0.005)


async def test_the_double_sees_a_call_cancelled_under_it(replica):
    # Without this the tests below could not tell an abandoned call from a cancelled one.
    servicer, address = replica
    servicer.delay_s = 0.2
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(
            model_name="champion", input={"rows": pack_rows(ROWS)}
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Predictions(request, timeout=0.02)
        await until(lambda: servicer.cancelled == 1)
    assert servicer.finished == 0


async def finishes_unobserved(servicer: SlowReplica, client: TorchServeClient) -> None:
    """The call given up on is counted as abandoned until it ends, and the replica
    finishes it: never cancelled."""
    assert client.abandoned().outstanding == 1
    await until(lambda: client.abandoned().outstanding == 0)
    assert (servicer.finished, servicer.cancelled) == (1, 0)


async def test_an_answer_in_time_leaves_nothing_behind(replica, client):
    scores = await client.predict(ROWS, 5.0)
    assert scores.scores == [0.5]
    assert client.abandoned().total == 0


async def test_a_wait_that_times_out_abandons_the_call_without_cancelling_it(replica, client):
    servicer, _ = replica
    servicer.delay_s = 0.2
    with pytest.raises(ModelTimeout):
        await client.predict(ROWS, 0.02)
    await finishes_unobserved(servicer, client)


async def test_a_cancelled_caller_abandons_the_call_without_cancelling_it(replica, client):
    servicer, _ = replica
    servicer.delay_s = 0.2
    caller = asyncio.create_task(client.predict(ROWS, 5.0))
    await asyncio.sleep(0.02)  # the call is out, its answer 0.18 s away
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await finishes_unobserved(servicer, client)


async def test_a_call_cut_by_its_channel_closing_is_unavailable_not_a_cancellation(replica, client):
    servicer, _ = replica
    servicer.delay_s = 0.5
    caller = asyncio.create_task(client.predict(ROWS, 5.0))
    await asyncio.sleep(0.05)
    await client.stop()
    with pytest.raises(ModelUnavailable, match="cancelled locally"):
        await caller


async def test_connect_gives_up_at_once_on_a_replica_that_refuses() -> None:
    """Readiness waits for the replicas' connections, but not for one that refuses the
    connection: the breaker deals with it."""
    absent = TorchServeClient("primary", f"127.0.0.1:{free_port()}", "champion")
    await absent.start()
    try:
        assert await asyncio.wait_for(absent.connect(60.0), 10.0) is False
    finally:
        await absent.stop()


async def test_connect_reaches_a_listening_replica(client) -> None:
    assert await client.connect(10.0) is True
