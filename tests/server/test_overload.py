"""Both replicas slowed (not stopped) and the load past what they serve in time: the
answers come before the caller's deadline (all but the few a saturated machine holds
up, ``LATE_SHARE_ALLOWED``), the model keeps answering what the replicas can serve, and
once the load drops the breakers close within 5 s.

The server runs as users run it (``python -m server``: its own process, uvloop), and
the load is set from this machine's own speed, measured first: a third of what the
server answers per second from the ladder alone. These machines run 2-4 x slower on some
days than on others; a fixed rate is past what the server itself can answer on a slow
day (then every answer is late whatever it does) and nowhere near overload on a fast one.
What the slowed replicas serve is measured the same way, in the same run: the model's
answers a second to callers that each wait for their answer (four at once), a load the
replicas keep up with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.processes import ManagedProcess
from loadtest.feature_keeper import fresh_features
from loadtest.loadgen import LoadGenerator, LoadResult, LoadSpec
from proto.decision.v1 import admin_pb2, decision_pb2
from tests.conftest import Replica
from tests.server.conftest import OPERATOR, VIEWER, ServerProcess, buy
from torchserve.replica import workers_lost

pytestmark = pytest.mark.integration

# The open-loop rate, as a share of the server's ladder-only throughput: 3-7 x what the
# slowed replicas serve. At 0.5 the server's own CPU was the limit besides the replicas
# (with the generator, both JVMs and the slowing on two cores).
LADDER_SHARE = 0.35
# Late answers allowed, as a share of the calls. This test saturates two cores itself, and
# an answer is late when the server or the generator is held off the CPU past the 12 ms
# margin the server keeps: 3-55 late answers (0.04-0.57 %) in 3 of 18 runs at 0.5 (one in
# CI), 11 (0.23 %) in 1 of 14 at 0.35, where the server's log showed its loop stalled
# 33 ms with 4 ms on the CPU and counted 1 of the 11 as sent late by its own clock. The
# failure this guards against was 3 % late at 500/s and 40 % at 1,000/s.
LATE_SHARE_ALLOWED = 0.005
SECONDS = 6.0
DEADLINE_S = 0.05
# How long the server may take to settle on the slowed replicas before the reference.
SETTLE_S = 15.0
MODEL_SOURCES = (decision_pb2.SOURCE_PRIMARY, decision_pb2.SOURCE_SECONDARY)
REPLICAS = ("primary", "secondary")


@contextlib.asynccontextmanager
async def slowed(
    procs: list[ManagedProcess], *, stopped_ms: float, running_ms: float
) -> AsyncIterator[None]:
    """Each process held off the CPU ``stopped_ms`` of every ``stopped_ms + running_ms``:
    a replica that answers, slowly and at a fraction of its throughput."""

    async def cycle() -> None:
        while True:
            for proc in procs:
                proc.pause()
            await asyncio.sleep(stopped_ms / 1000)
            for proc in procs:
                proc.resume()
            await asyncio.sleep(running_ms / 1000)

    task = asyncio.create_task(cycle())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for proc in procs:
            proc.resume()


async def set_breakers(server: ServerProcess, mode: admin_pb2.BreakerMode.ValueType) -> None:
    for replica in REPLICAS:
        await server.admin.SetBreaker(
            admin_pb2.SetBreakerRequest(replica=replica, mode=mode, reason="overload test"),
            metadata=OPERATOR,
            timeout=5.0,
        )


def decide_load(server: ServerProcess, **load: Any) -> LoadSpec:
    """Decide calls to ``server`` over two connections, shaped by ``load`` (LoadSpec's
    fields: mode, duration, concurrency or rate, deadline)."""
    load.setdefault("max_requests", 100_000)
    return LoadSpec(target="decide", address=f"127.0.0.1:{server.port}", channels=2, **load)


async def ladder_throughput(server: ServerProcess, generator: LoadGenerator) -> float:
    """Decisions a second the server answers with both breakers forced open (closed
    loop, 16 callers): what it can do without the model on this machine today."""
    await set_breakers(server, admin_pb2.BREAKER_MODE_FORCE_OPEN)
    spec = decide_load(
        server, mode="closed", seconds=2.0, warmup_s=0.5, concurrency=16, timeout_s=1.0
    )
    try:
        result = await asyncio.to_thread(generator.run, spec)
    finally:
        await set_breakers(server, admin_pb2.BREAKER_MODE_AUTO)
    assert result.ok > 0 and not result.errors, result.errors
    return result.throughput_per_s


async def model_answers_in_time(server: ServerProcess) -> None:
    """Waits (at most 20 s: a replica the ladder measurement left alone is idle) until
    the model answers in time again."""
    deadline = time.monotonic() + 20.0
    while True:
        response = await server.decisions.Decide(buy(), timeout=1.0)
        if response.source in MODEL_SOURCES:
            return
        assert time.monotonic() < deadline, response.reason
        await asyncio.sleep(0.05)


async def model_back(server: ServerProcess, within_s: float, why: str) -> None:
    """Waits until both breakers are closed and the model answers a decision; fails after
    ``within_s`` with what it saw last, and ``why``."""
    deadline = time.monotonic() + within_s
    while True:
        response = await server.decisions.Decide(buy(), timeout=1.0)
        status = await server.admin.GetStatus(
            admin_pb2.GetStatusRequest(), metadata=VIEWER, timeout=1.0
        )
        states = {r.name: r.breaker_state for r in status.replicas if r.name in REPLICAS}
        if set(states.values()) == {"closed"} and response.source in MODEL_SOURCES:
            return
        assert time.monotonic() < deadline, (states, response.reason, why)
        await asyncio.sleep(0.05)


def within_capacity(server: ServerProcess) -> LoadSpec:
    """Four callers, each waiting for its answer: a load the slowed replicas keep up with."""
    return decide_load(
        server, mode="closed", seconds=3.0, warmup_s=0.5, concurrency=4, timeout_s=DEADLINE_S
    )


def lost_since(before: dict[str, int], replicas: dict[str, Replica]) -> dict[str, int]:
    """Workers each replica has lost since ``before`` (a replica left without one answers
    nothing for minutes: the likeliest cause when the model stops answering)."""
    return {name: workers_lost(r.dir) - before[name] for name, r in replicas.items()}


def modelled(result: LoadResult) -> int:
    return sum(
        n for s, n in result.answers.items() if decision_pb2.Source.Value(s) in MODEL_SOURCES
    )


async def test_slowed_replicas_past_capacity_answer_in_time_and_recover(
    server_processes, replicas, redis_instance, key_prefix
):
    async with fresh_features(redis_instance.url, key_prefix):
        [server] = server_processes(1)
        lost_before = {name: workers_lost(r.dir) for name, r in replicas.items()}
        try:
            await model_answers_in_time(server)
            with LoadGenerator(processes=1) as generator:
                await asyncio.to_thread(generator.wait_ready)
                rate = LADDER_SHARE * await ladder_throughput(server, generator)
                await model_answers_in_time(server)
                spec = decide_load(
                    server,
                    mode="open",
                    seconds=SECONDS,
                    warmup_s=1.0,
                    max_requests=int(rate * SECONDS),
                    rate_per_s=rate,
                    timeout_s=DEADLINE_S,
                )
                procs = [r.proc for r in replicas.values()]
                async with slowed(procs, stopped_ms=8, running_ms=8):
                    # The slowing's onset can time calls out and open both breakers (for
                    # 2 s, then probed): in a failed CI run that took most of the 3 s
                    # reference. The reference is what the slowed replicas serve once
                    # the server has settled on them.
                    await model_back(
                        server,
                        SETTLE_S,
                        f"slowed, workers lost {lost_since(lost_before, replicas)}",
                    )
                    served = await asyncio.to_thread(generator.run, within_capacity(server))
                    result = await asyncio.to_thread(generator.run, spec)

            served_per_s = modelled(served) / served.spec.seconds
            seen = (
                f"at {rate:.0f}/s: answers {result.answers}, errors {result.errors},"
                f" p99 {result.percentile_ms(99):.1f} ms; within capacity the model answered"
                f" {served_per_s:.0f}/s ({served.answers}, errors {served.errors}); TorchServe"
                f" workers lost {lost_since(lost_before, replicas)}"
            )
            # Within capacity the replicas, slowed as they are, keep up: the reference. The
            # model gave 34-99 % of the answers in 29 of 30 runs here (34 % on a stretch
            # where the ladder alone ran at 2/3 of its usual speed); in one it stopped
            # answering (0.3 %). On a slow hour (2026-11-25 21:15) that was 1 run in 4,
            # the model client before and after 852e2b3 alike, and once in CI: both
            # breakers opened at the slowing's onset, before the reference waited for
            # them to close. An hour later it failed 8 runs of 10 even so (3 of 5 with the
            # old client, 5 of 5 with the new): the breakers opened again during the
            # reference, four callers being more than the slowed replicas served in time
            # on that hour. Open: the slowing should follow the replicas' measured speed,
            # as the load follows the ladder's. A lower reference makes the comparison
            # past capacity below easier, so it must stay well above nothing.
            assert modelled(served) >= 0.25 * served.ok > 0, seen
            assert result.ok > 0.5 * rate * SECONDS, seen
            late = result.errors.get("DEADLINE_EXCEEDED", 0)
            assert late <= LATE_SHARE_ALLOWED * result.spec.max_requests, seen
            # No collapse onto the ladder: past capacity the model answers at least as many
            # a second as within it (its calls carry more rows as the load grows; 2.2-4.5 x
            # measured at 0.35, and 0.3-0.5 x when it collapsed).
            assert modelled(result) / SECONDS >= served_per_s, seen

            # The load and the slowing are over: within 5 s the model answers and both
            # breakers are closed again.
            await model_back(
                server, 5.0, f"workers lost since the start {lost_since(lost_before, replicas)}"
            )
        finally:
            await server.close()
