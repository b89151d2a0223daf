"""A call whose caller stops waiting is abandoned, never cancelled, against real TorchServe.

TorchServe restarts a worker (and reloads its model) when a gRPC call it is answering
is cancelled (pytorch/serve issues 1888, 3087). Cancelling at a short deadline restarts
workers; the model client's abandoning at the same deadline must not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from core.processes import ManagedProcess, free_ports
from feature_cache.schema import MODEL_INPUT_WIDTH, pack_rows
from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc
from server.model_client import (
    ModelBusy,
    ModelCallError,
    ModelTimeout,
    TorchServeClient,
)
from torchserve.archive import ArchiveInfo
from torchserve.replica import (
    ModelServing,
    ReplicaPorts,
    start_replica,
    torchserve_replica,
    worker_restarts,
)

pytestmark = pytest.mark.integration

CALLERS = 4  # concurrent callers, each calling in a loop
SHORT_WAIT_S = 0.003  # shorter than most answers on this machine: most calls time out


@pytest.fixture
def own_replica(
    model_store: tuple[Path, ArchiveInfo], tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    """A replica of this test's own: its workers are restarted on purpose.

    With TorchServe's batching on (8 rows, 1 ms), as the primary ran until 2026-11-23: a
    call then spends its first millisecond in the frontend's batch, so 3 ms deadlines cut
    calls the worker is answering often enough for the defect to show within the
    test's bound; without batching a call is answered so fast that a run sometimes cut
    none mid-answer."""
    store, _ = model_store
    ports = ReplicaPorts(*free_ports(6))
    batched = ModelServing(batch_size=8, max_batch_delay_ms=1).properties()
    proc: ManagedProcess = torchserve_replica(
        "primary", ports, store, tmp_path, model_section=batched
    )
    try:
        start_replica(proc, ports)
        yield f"127.0.0.1:{ports.grpc_inference}", tmp_path / "primary"
    finally:
        proc.stop()


async def _cancelling_callers(address: str, until: float) -> int:
    """Calls with a 3 ms gRPC deadline, the way a client enforcing its budget on the wire
    does; returns how many calls ended DEADLINE_EXCEEDED."""
    request = inference_pb2.PredictionsRequest(
        model_name="champion", input={"rows": pack_rows([[0.0] * MODEL_INPUT_WIDTH])}
    )
    cut = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)

        async def caller() -> None:
            nonlocal cut
            while time.monotonic() < until:
                try:
                    await stub.Predictions(request, timeout=SHORT_WAIT_S)
                except grpc.aio.AioRpcError as exc:
                    cut += exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    await asyncio.sleep(0.001)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return cut


async def _abandoning_callers(client: TorchServeClient, until: float) -> int:
    """The same load through the model client; returns how many waits timed out."""
    row = [[0.0] * MODEL_INPUT_WIDTH]
    timed_out = 0

    async def caller() -> None:
        nonlocal timed_out
        while time.monotonic() < until:
            try:
                await client.predict(row, SHORT_WAIT_S)
            except ModelTimeout:
                timed_out += 1
            except ModelBusy:
                await asyncio.sleep(0.001)

    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return timed_out


async def test_abandoned_calls_never_restart_a_worker_where_cancelled_calls_do(own_replica):
    address, replica_dir = own_replica
    # First the client under test, on a replica whose worker never restarted.
    client = TorchServeClient("primary", address, "champion", max_abandoned_calls=64)
    await client.start()
    try:
        before = worker_restarts(replica_dir)
        timed_out = await _abandoning_callers(client, time.monotonic() + 15)
        abandoned = client.abandoned()
    finally:
        await client.stop(grace_s=5.0)
    await asyncio.sleep(2)  # a restart is logged within a second of the cancel
    assert timed_out > 50, "the load did not make calls time out: the test proves nothing"
    assert abandoned.total > 50  # (a wait may end just as its answer arrives)
    assert worker_restarts(replica_dir) == before

    # Then the same load cancelling on the wire: the defect reproduces (bounded: 40 s).
    before = worker_restarts(replica_dir)
    cut = 0
    deadline = time.monotonic() + 40
    while worker_restarts(replica_dir) == before and time.monotonic() < deadline:
        cut += await _cancelling_callers(address, time.monotonic() + 5)
        await asyncio.sleep(1.5)
    assert cut > 0
    assert worker_restarts(replica_dir) > before, "cancelled calls did not restart a worker"


async def test_a_hung_replica_gets_no_more_than_the_bound_of_abandoned_calls(own_replica):
    address, _ = own_replica
    row = [[0.0] * MODEL_INPUT_WIDTH]
    client = TorchServeClient("primary", address, "champion", max_abandoned_calls=3)
    await client.start()
    try:
        assert (await client.predict(row, 5.0)).scores
        # The replica answers in milliseconds; a wait of 0.1 ms ends first every time.
        outcomes: list[type[ModelCallError]] = []
        for _ in range(5):
            try:
                await client.predict(row, 0.0001)
            except ModelCallError as exc:
                outcomes.append(type(exc))
        assert outcomes[:3] == [ModelTimeout] * 3
        assert outcomes[3:] == [ModelBusy] * 2
        assert client.abandoned().outstanding == 3
        assert client.abandoned().refused == 2
        # The abandoned calls finish on the wire and the replica is called again.
        deadline = time.monotonic() + 5
        while client.abandoned().outstanding:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert (await client.predict(row, 5.0)).scores
    finally:
        await client.stop()
