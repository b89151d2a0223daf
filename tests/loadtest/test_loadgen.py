"""The load generator's measuring: merged percentiles, open-loop timing, closed-loop bounds."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from core.processes import ManagedProcess, free_port, listening, start_ready
from decision_client.v1 import decision_pb2
from feature_cache.schema import MODEL_INPUT_WIDTH
from loadtest.loadgen import (
    LoadGenerator,
    LoadSpec,
    Recorder,
    closed_loop,
    make_call,
    merge_histograms,
    new_histogram,
    open_loop,
)
from proto.third_party.torchserve import inference_pb2

REPO = Path(__file__).resolve().parents[2]


def test_merged_histograms_give_the_percentiles_of_one_histogram_with_every_value() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(7, 1.2)) + 1 for _ in range(30_000)]
    whole = new_histogram()
    parts = [new_histogram() for _ in range(3)]
    for i, value in enumerate(values):
        whole.record_value(value)
        parts[i % 3].record_value(value)

    merged = merge_histograms(part.encode() for part in parts)

    assert merged.get_total_count() == len(values)
    for percent in (50, 90, 99, 99.9, 100):
        assert merged.get_value_at_percentile(percent) == whole.get_value_at_percentile(percent)
    # The percentiles are of the values, not of one part: each part alone differs at the tail.
    assert any(
        part.get_value_at_percentile(99.9) != whole.get_value_at_percentile(99.9) for part in parts
    )


@pytest.mark.timed
async def test_open_loop_counts_latency_from_the_scheduled_send_time() -> None:
    """The event loop is blocked 40 ms of every 50 ms (as by a saturated generator): calls
    due meanwhile go out late and answer at once. From the schedule their latency is the
    wait; from the moment they went out it would be ~0 (coordinated omission)."""

    async def instant_call() -> str:
        await asyncio.sleep(0)
        return "ok"

    async def hog_the_loop() -> None:
        while True:
            time.sleep(0.040)  # noqa: ASYNC251 - blocks the loop on purpose
            await asyncio.sleep(0.010)

    hog = asyncio.create_task(hog_the_loop())
    recorder = Recorder()
    try:
        await open_loop(instant_call, recorder, rate_per_s=500, seconds=0.5, max_requests=1000)
    finally:
        hog.cancel()

    assert recorder.ok == 250
    assert recorder.send_lag_max_s > 0.020
    assert recorder.histogram.get_value_at_percentile(50) / 1000 > 5  # ms


async def test_open_loop_in_bursts_sends_each_burst_at_once_at_the_same_mean_rate() -> None:
    sent: list[float] = []

    async def noted_call() -> str:
        sent.append(time.perf_counter())
        return "ok"

    recorder = Recorder()
    await open_loop(noted_call, recorder, rate_per_s=400, seconds=0.2, max_requests=1000, burst=8)
    assert recorder.ok == 80
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    # 10 bursts of 8, 20 ms apart: 70 gaps within a burst, 9 between bursts (one at a
    # time, 2.5 ms apart, there would be none of 10 ms).
    assert sum(gap < 0.010 for gap in gaps) >= 60
    assert sum(gap >= 0.010 for gap in gaps) >= 5
    assert sent[-1] - sent[0] >= 0.9 * 9 * 8 / 400


@pytest.fixture
async def serialized_slow_server() -> AsyncIterator[str]:
    """An in-process Decide server answering one call at a time, each after 20 ms."""
    one_at_a_time = asyncio.Lock()

    async def decide(
        request: decision_pb2.DecideRequest,
        context: grpc.aio.ServicerContext[decision_pb2.DecideRequest, decision_pb2.DecideResponse],
    ) -> decision_pb2.DecideResponse:
        async with one_at_a_time:
            await asyncio.sleep(0.020)
        return decision_pb2.DecideResponse(source=decision_pb2.SOURCE_RULES)

    handler = grpc.unary_unary_rpc_method_handler(
        decide,
        request_deserializer=decision_pb2.DecideRequest.FromString,
        response_serializer=decision_pb2.DecideResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("decision.v1.DecisionService", {"Decide": handler}),)
    )
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@pytest.mark.timed
async def test_open_loop_above_capacity_shows_the_queue_closed_loop_does_not(
    serialized_slow_server: str,
) -> None:
    """100 calls/s to a server that manages 50/s: the queue, and so the latency, grows
    for the whole run; a closed loop only ever sees the 20 ms service time."""
    spec = LoadSpec(
        target="echo", address=serialized_slow_server, mode="closed", seconds=1, max_requests=100
    )
    async with grpc.aio.insecure_channel(serialized_slow_server) as channel:
        call = make_call(channel, spec)
        opened, closed = Recorder(), Recorder()
        await open_loop(call, opened, rate_per_s=100, seconds=0.6, max_requests=100)
        await closed_loop(call, closed, concurrency=1, seconds=0.3, max_requests=100)

    open_p50_ms = opened.histogram.get_value_at_percentile(50) / 1000
    closed_p50_ms = closed.histogram.get_value_at_percentile(50) / 1000
    assert opened.ok == 60
    assert opened.answers == {"SOURCE_RULES": 60}
    assert opened.histogram.get_value_at_percentile(99) / 1000 > 300
    assert closed_p50_ms < 60  # ~20 ms of service
    assert open_p50_ms > 5 * closed_p50_ms


async def test_closed_loop_keeps_exactly_its_callers_in_flight_and_stops_at_max_requests() -> None:
    in_flight = 0
    most = 0

    async def call() -> str:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(random.uniform(0, 0.002))
        in_flight -= 1
        return "ok"

    recorder = Recorder()
    await closed_loop(call, recorder, concurrency=5, seconds=5.0, max_requests=400)

    assert most == 5  # never more, and it did reach 5 at once
    assert recorder.ok == 400


async def test_a_refused_closed_loop_caller_backs_off_instead_of_spinning() -> None:
    async def refused() -> str:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "queue full"
        )

    recorder = Recorder()
    await closed_loop(refused, recorder, concurrency=1, seconds=0.3, max_requests=10_000)

    # Waits of 1, 2, 4 ... up to 50 ms (each jittered down to half): at most 20 calls in
    # 0.3 s, where resending at once makes thousands.
    assert 5 <= recorder.errors["CANCELLED"] <= 20
    assert recorder.ok == 0


def test_a_spec_splits_into_shares_that_add_up_to_it() -> None:
    closed = LoadSpec("decide", "127.0.0.1:1", "closed", 1.0, 101, concurrency=7, processes=2)
    assert [s.concurrency for s in closed.shares()] == [4, 3]
    assert sum(s.max_requests for s in closed.shares()) == 101
    single = LoadSpec("decide", "127.0.0.1:1", "closed", 1.0, 10, concurrency=1, processes=2)
    assert len(single.shares()) == 1

    opened = LoadSpec("echo", "127.0.0.1:1", "open", 1.0, 10, rate_per_s=1000, processes=2)
    assert [(s.rate_per_s, s.phase_s) for s in opened.shares()] == [(500, 0.0), (500, 0.001)]


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"address": "10.0.0.5:50051"}, "loopback addresses only"),
        ({"seconds": 0.0}, "seconds and warmup_s must be within"),
        ({"seconds": 3600.0}, "seconds and warmup_s must be within"),
        ({"max_requests": 0}, "max_requests, processes, channels, rows, burst and timeout_s"),
        ({"mode": "open", "rate_per_s": 10.0, "burst": 0}, "rows, burst and timeout_s must"),
        ({"target": "torchserve", "rows": 0}, "max_requests, processes, channels, rows"),
        ({"mode": "open", "rate_per_s": 0.0}, "open loop needs rate_per_s"),
    ],
)
def test_a_spec_is_refused_when_unbounded_or_off_loopback(
    changes: dict[str, object], why: str
) -> None:
    fields: dict[str, object] = {
        "target": "echo",
        "address": "127.0.0.1:50051",
        "mode": "closed",
        "seconds": 1.0,
        "max_requests": 10,
    }
    with pytest.raises(ValueError, match=why):
        LoadSpec(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.timed
def test_worker_processes_measure_an_echo_server_and_count_errors(tmp_path: Path) -> None:
    port, nobody = free_port(), free_port()
    echo = ManagedProcess(
        "echo-server",
        [sys.executable, "-m", "loadtest.stand_ins", "echo", "--port", str(port)],
        cwd=REPO,
        log_path=tmp_path / "echo.log",
    )
    start_ready(echo, listening(port), 20)
    try:
        with LoadGenerator(2) as generator:
            generator.wait_ready()
            address = f"127.0.0.1:{port}"
            closed = generator.run(
                LoadSpec("echo", address, "closed", 0.5, 100_000, concurrency=4, processes=2)
            )
            opened = generator.run(
                LoadSpec("echo", address, "open", 0.5, 100_000, rate_per_s=200, processes=2)
            )
            refused = generator.run(
                LoadSpec("echo", f"127.0.0.1:{nobody}", "closed", 0.3, 20, warmup_s=0.0)
            )
    finally:
        echo.stop()

    assert closed.ok > 0 and closed.errors == {}
    assert closed.histogram.get_total_count() == closed.ok
    assert closed.answers == {"SOURCE_ABSTAIN": closed.ok}
    assert len({w.pid for w in closed.workers}) == 2 and all(w.ok for w in closed.workers)
    assert closed.throughput_per_s > 0
    assert opened.ok == 100  # 2 processes x 100/s x 0.5 s, every one answered
    assert 150 < opened.throughput_per_s < 250
    # Nobody listens: each call refused and counted, the caller backing off between them.
    assert refused.ok == 0 and list(refused.errors) == ["UNAVAILABLE"]
    assert 5 <= refused.errors["UNAVAILABLE"] <= 20


async def test_a_model_server_call_carries_the_rows_the_spec_asks() -> None:
    rows_seen: list[int] = []

    async def predictions(
        request: inference_pb2.PredictionsRequest, _: object
    ) -> inference_pb2.PredictionResponse:
        rows_seen.append(len(request.input["rows"]) // (4 * MODEL_INPUT_WIDTH))  # float32
        return inference_pb2.PredictionResponse(prediction=b'{"scores": []}')

    # Predictions alone: the one method a load generator's model-server call uses.
    handler = grpc.unary_unary_rpc_method_handler(
        predictions,
        request_deserializer=inference_pb2.PredictionsRequest.FromString,
        response_serializer=inference_pb2.PredictionResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(
            "org.pytorch.serve.grpc.inference.InferenceAPIsService", {"Predictions": handler}
        )]
    )  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            for rows in (1, 64):
                spec = LoadSpec(target="torchserve", address=address, mode="closed",
                                seconds=1, max_requests=1, rows=rows)  # fmt: skip
                assert await make_call(channel, spec)() == "scored"
    finally:
        await server.stop(None)
    assert rows_seen == [1, 64]
